"""Where a finished training's export goes, what status says about it, and how it replaces an older one."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

from k2_api.common import DType
from k2_api.training import Checkpointing, K2Training
from k2_workers.model import K2Config, K2ForCausalLM, load_pretrained
from k2_workers.train.cli import config_from_args, parse_args
from k2_workers.train.config import load_manifest, resolve_config
from k2_workers.train.export import export_record, report_export, write_export
from k2_workers.train.export_target import ExportTarget, export_dtype, export_target, local_export_target

MANIFEST = Path(__file__).parent / "k2training-test.yaml"


def test_the_export_sits_beside_checkpoints_that_outlive_the_pods() -> None:
    by_uri = Checkpointing(uri="file:///shared/ckpt/")
    assert export_target(by_uri, "/shared/ckpt") == ExportTarget("/shared/ckpt/export", "file:///shared/ckpt/export")
    by_claim = Checkpointing(claim_name="train-ckpt", mount_path="/checkpoints")
    assert export_target(by_claim, "/checkpoints") == ExportTarget("/checkpoints/export", "pvc://train-ckpt/export")
    assert export_target(Checkpointing(), "/checkpoints") is None  # an emptyDir dies with its pod
    assert export_target(by_claim, None) is None  # outside the cluster the claim is not mounted


def test_the_manifest_and_flags_resolve_the_export(tmp_path: Path) -> None:
    manifest = load_manifest(MANIFEST)
    assert resolve_config(manifest, {}).export_dir is None
    assert resolve_config(manifest, {}, in_cluster=True).export_dir is None  # emptyDir

    manifest["spec"]["checkpointing"]["claimName"] = "train-ckpt"
    cfg = resolve_config(manifest, {}, in_cluster=True)
    assert (cfg.export_dir, cfg.export_uri) == ("/checkpoints/export", "pvc://train-ckpt/export")
    assert cfg.export_dtype == "fp32"

    args = parse_args(["--config", str(MANIFEST), "--export-dir", str(tmp_path / "out")])
    cfg = config_from_args(args)
    assert (cfg.export_dir, cfg.export_uri) == (str(tmp_path / "out"), f"file://{tmp_path / 'out'}")
    assert local_export_target("rel").dir.startswith("/")


def test_fp8_runs_export_bf16() -> None:
    assert [export_dtype(d) for d in (DType.FP32, DType.BF16, DType.FP8)] == [DType.FP32, DType.BF16, DType.BF16]
    manifest = load_manifest(MANIFEST)
    manifest["spec"]["model"]["dtype"] = "fp8"
    assert resolve_config(manifest, {}).export_dtype == "bf16"


def test_the_status_record_validates_against_the_api() -> None:
    record = export_record("pvc://c/export", 30, "bf16", datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
    assert record == {"uri": "pvc://c/export", "step": 30, "dtype": "bf16", "writtenAt": "2026-01-02T03:04:05Z"}
    body = {**load_manifest(MANIFEST), "status": {"export": record}}
    status = K2Training.model_validate(body).status
    assert status is not None and status.export is not None and status.export.step == 30


def test_outside_a_cluster_the_export_is_not_reported() -> None:
    assert not report_export(export_record("file:///x", 1, "fp32"), env={})


def _model(seed: int) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return K2ForCausalLM(K2Config.from_preset("k2-debug"))


def test_an_export_replaces_the_older_one_whole_and_keeps_the_tokenizer(tmp_path: Path) -> None:
    source = tmp_path / "start"  # the checkpoint a fine-tuning run started from
    source.mkdir()
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    target = tmp_path / "ckpt" / "export"
    target.parent.mkdir()

    write_export(_model(1), target, DType.FP32, max_shard_bytes=100_000)
    (target / "stale.safetensors").write_text("left by the older export")
    second = _model(2)
    write_export(second, target, DType.FP32, tokenizer_dir=source, max_shard_bytes=100_000)

    assert sorted(p.name for p in target.parent.iterdir()) == ["export"]  # no .tmp, no .deleting-* left
    names = sorted(p.name for p in target.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(n.startswith("model-") and "-of-" in n for n in shards)
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= set(names)
    loaded = load_pretrained(target)
    for name, tensor in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_bf16_export_stores_bf16(tmp_path: Path) -> None:
    write_export(_model(0), tmp_path / "export", "bf16")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "export", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        write_export(_model(0), tmp_path / "other", "fp8")
