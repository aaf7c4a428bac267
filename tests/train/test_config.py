from pathlib import Path

import pytest

from k2_workers.train.cli import config_from_args, main, parse_args
from k2_workers.train.config import RunConfig, load_manifest, resolve_config

MANIFEST = Path(__file__).parent / "k2training-test.yaml"


def test_manifest_fields_map_to_the_run_config() -> None:
    cfg = resolve_config(load_manifest(MANIFEST), {})
    assert (cfg.name, cfg.model_preset, cfg.dataset) == ("train-test", "k2-debug", "builtin:synthetic")
    assert (cfg.seq_len, cfg.micro_batch_size, cfg.steps, cfg.lr) == (64, 4, 30, 0.01)
    assert (cfg.warmup_steps, cfg.decay_steps, cfg.final_lr_ratio) == (3, 10, 0.1)
    assert (cfg.checkpoint_every, cfg.keep_last) == (10, 2)
    assert cfg.checkpoint_dir is None  # the mounted path is only used in a cluster
    assert resolve_config(load_manifest(MANIFEST), {}, in_cluster=True).checkpoint_dir == "/checkpoints"


def test_flags_override_the_manifest(tmp_path: Path) -> None:
    args = parse_args(
        [
            "--config",
            str(MANIFEST),
            "--steps",
            "7",
            "--checkpoint-dir",
            str(tmp_path),
            "--checkpoint-every",
            "2",
            "--seed",
            "9",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.checkpoint_dir, cfg.checkpoint_every, cfg.seed) == (7, str(tmp_path), 2, 9)
    assert cfg.lr == 0.01  # the rest stays


def test_checkpoint_uri_and_bad_values(tmp_path: Path) -> None:
    manifest = load_manifest(MANIFEST)
    manifest["spec"]["checkpointing"]["uri"] = f"file://{tmp_path}"
    assert resolve_config(manifest, {}).checkpoint_dir == str(tmp_path)
    manifest["spec"]["checkpointing"]["uri"] = "s3://bucket/ckpt"
    with pytest.raises(ValueError, match=r"spec.checkpointing.uri"):
        resolve_config(manifest, {})
    with pytest.raises(ValueError, match="seq_len"):
        RunConfig(seq_len=0)
    with pytest.raises(ValueError, match="K2Training"):
        resolve_config({"apiVersion": "k2.ai/v1alpha1", "kind": "K2Serving", "spec": {}}, {})


def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: k2.ai/v1alpha1\nkind: K2Training\nspec: {image: i, model: {preset: nope}}\n")
    assert main(["--config", str(bad)]) == 2
