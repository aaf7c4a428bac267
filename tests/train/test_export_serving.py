"""From training to serving, as processes on loopback: two `k2 worker train` ranks (gloo) train k2-debug on the
bundled corpus and export it; the export holds the final checkpoint's weights exactly, loads in transformers'
DeepseekV3ForCausalLM (the numerical oracle), and a `k2 worker serve` rank whose K2Serving's
spec.model.checkpointUri names it completes a corpus prefix greedily with the tokens of the checkpoint loaded in one
process."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from k2_workers.model import K2Config, K2ForCausalLM, generate, load_pretrained
from k2_workers.optim import MuonClip
from k2_workers.tokenizer import ByteTokenizer
from k2_workers.train.checkpoint_files import apply_checkpoint, read_checkpoint
from k2_workers.train.corpus import generate_corpus
from tests.serve.worker_process import request, serve_processes, wait_healthy
from tests.support.ports import free_port
from tests.train.launch import start_ranks

pytestmark = pytest.mark.distributed

STEPS = 30
NEW_TOKENS = 24
SERVING = Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml"
PREFIX = generate_corpus()[0][:40]  # the start of the bundled corpus's first story


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(export directory, final training checkpoint) of a 2-rank run of STEPS steps."""
    root = tmp_path_factory.mktemp("train")
    checkpoints, export, logs = root / "ckpt", root / "export", root / "logs"
    logs.mkdir()
    args = ["--steps", str(STEPS), "--checkpoint-dir", str(checkpoints), "--export-dir", str(export), "--json"]
    ranks = start_ranks(args, world_size=2, log_dir=logs)
    codes = [rank.wait(timeout=600) for rank in ranks]
    assert codes == [0, 0], [(logs / f"rank{i}.err").read_text()[-2000:] for i in range(2)]
    steps = [json.loads(line)["step"] for line in (logs / "rank0.out").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    return export, checkpoints / f"step-{STEPS}"


def _prompt() -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(PREFIX)])


def _greedy(model: Any) -> list[int]:
    with torch.no_grad():
        out = generate(model.eval(), _prompt(), NEW_TOKENS)
    return [int(t) for t in out[0, _prompt().shape[1] :]]


def _checkpoint_in_one_process(checkpoint: Path) -> K2ForCausalLM:
    """The final training checkpoint (rank 0's files: expert parallelism is off) in a fresh model."""
    model = K2ForCausalLM(K2Config.from_preset("k2-debug"))
    apply_checkpoint(read_checkpoint(checkpoint, 0, None), model, MuonClip(model, lr=0.01))
    return model


def _transformers(export: Path) -> Any:
    """transformers' DeepseekV3ForCausalLM on the export. The config says model_type kimi_k2, as Kimi-K2's does
    (whose own code ships with the checkpoint); built as DeepSeek-V3 it loads the same tensors."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = json.loads((export / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map", "torch_dtype"):
        fields.pop(key, None)
    config = DeepseekV3Config(**fields, attn_implementation="eager", experts_implementation="eager")
    return DeepseekV3ForCausalLM.from_pretrained(export, config=config).eval()


def _hf_greedy(model: Any) -> list[int]:
    """Greedy decoding with full forwards (no cache): the reference for our cached `generate`."""
    ids = _prompt()
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return [int(t) for t in ids[0, _prompt().shape[1] :]]


def test_the_export_holds_the_final_checkpoint_and_completes_like_it(trained: tuple[Path, Path]) -> None:
    export, checkpoint = trained
    assert (export / "config.json").is_file() and (export / "model.safetensors.index.json").is_file()
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index  # DeepSeek-V3 / Kimi-K2 names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index

    exported, reference = load_pretrained(export), _checkpoint_in_one_process(checkpoint)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    expected = _greedy(reference)
    print(f"greedy completion of {PREFIX!r}: {ByteTokenizer().decode(expected)!r}")
    assert _greedy(exported) == expected
    assert len(set(expected)) > 1  # a trained model, not one repeated token

    oracle = _transformers(export)
    assert _hf_greedy(oracle) == expected
    with torch.no_grad():
        ours_logits, hf_logits = exported(_prompt()).logits, oracle(_prompt()).logits
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4


def test_a_serving_rank_on_the_export_gives_the_same_completion(trained: tuple[Path, Path], tmp_path: Path) -> None:
    export, checkpoint = trained
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(SERVING.read_text()))
    document["spec"]["ranksPerGroup"] = 1
    document["spec"]["model"]["checkpointUri"] = f"file://{export}"
    manifest = tmp_path / "serving.yaml"
    manifest.write_text(yaml.safe_dump(document))
    port = free_port()
    argv = ["--config", str(manifest), "--port", str(port), "--metrics-port", "-1"]
    url = f"http://127.0.0.1:{port}"
    with serve_processes([argv], [{"WORLD_SIZE": "1", "RANK": "0"}]) as (worker,):
        wait_healthy(url, worker)
        status, body = request(url + "/v1/generate", {"prompt": PREFIX, "max_new_tokens": NEW_TOKENS})
    assert status == 200, body
    assert body["tokens"] == _greedy(_checkpoint_in_one_process(checkpoint))
