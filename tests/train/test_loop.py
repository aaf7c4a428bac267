"""The training loop in one process (no process group): step records, the Switch loss, router-bias updates."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import torch

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.optim import MuonClip
from k2_workers.train.checkpoint import CheckpointManager, latest_checkpoint
from k2_workers.train.config import RunConfig
from k2_workers.train.loop import train


def _run(tmp_path: Path, **overrides: Any) -> list[dict[str, Any]]:
    values: dict[str, Any] = {"steps": 3, "warmup_steps": 1, "decay_steps": 1, "seq_len": 32, "micro_batch_size": 2}
    cfg = RunConfig(**(values | {"device": "cpu"} | overrides))
    out = io.StringIO()
    assert train(cfg, out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_single_process_run_prints_steps_and_updates_router_biases(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    lines = _run(tmp_path, checkpoint_dir=str(tmp_path), router_bias_update_rate=0.01)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["max_attn_logit"] > 0 for r in lines)
    assert signal.getsignal(signal.SIGTERM) == handler  # the worker's handlers are gone again

    model = K2ForCausalLM(K2Config.from_preset("k2-debug"))
    path = latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step-3"
    state = CheckpointManager(tmp_path).load(path, model, MuonClip(model))
    assert state.step == 3 and state.extra["data"]["consumed_samples"] == 6
    biases = torch.stack([b for moe in model.moe_blocks() if (b := moe.gate.e_score_correction_bias) is not None])
    # three sign steps of 0.01, each recentred (moving an entry by at most 2·0.01): non-zero, mean zero, bounded
    assert biases.abs().max() > 0 and biases.abs().max() <= 0.06 + 1e-6
    torch.testing.assert_close(biases.mean(dim=1), torch.zeros(len(biases)), atol=1e-6, rtol=0)


def test_switch_aux_loss_is_reported_and_trained_on(tmp_path: Path) -> None:
    plain = _run(tmp_path / "plain", steps=1, warmup_steps=0, decay_steps=0)
    with_aux = _run(tmp_path / "aux", steps=1, warmup_steps=0, decay_steps=0, aux_loss_alpha=0.5)
    assert "aux_loss" not in plain[0] and with_aux[0]["aux_loss"] > 0
    assert with_aux[0]["loss"] == plain[0]["loss"]  # the same forward; the language-model loss is what is logged
    assert with_aux[0]["grad_norm"] != plain[0]["grad_norm"]  # but the balance loss took part in backward
