"""Training Mixtral: QK-Clip's rule for GQA's shared keys, MuonClip on a GQA model, the worker's training loop on
the mixtral-debug preset, and the dropped-token rate in its step lines and status under Switch-style capacity."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_api import K2Training
from k2_workers.model import K2Config, K2ForCausalLM, switch_routing
from k2_workers.model.gqa import GQAttention
from k2_workers.model.switch import SWITCH_AUX_LOSS_ALPHA
from k2_workers.optim import MuonClip
from k2_workers.train import loop
from k2_workers.train.config import RunConfig
from k2_workers.train.loop import train
from k2_workers.train.status import StatusReporter
from tests.operator.resources import example


def _head_logits(attn: GQAttention, x_SD: torch.Tensor) -> torch.Tensor:
    """[H, S, S] q·k of every query head with its KV head (no RoPE: the clip acts on the projections)."""
    s = x_SD.shape[0]
    q_HSK = attn.q_proj(x_SD).view(s, attn.num_heads, -1).transpose(0, 1)
    k_GSK = attn.k_proj(x_SD).view(s, attn.num_kv_heads, -1).transpose(0, 1)
    k_HSK = k_GSK.repeat_interleave(attn.heads_per_kv_head, dim=0)
    return q_HSK @ k_HSK.transpose(1, 2)


def test_gqa_clip_scales_each_heads_logits_by_its_own_gamma() -> None:
    config = K2Config.from_hf_config(
        {"model_type": "mixtral", "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
         "intermediate_size": 32, "num_hidden_layers": 1, "vocab_size": 16}
    )  # fmt: skip
    torch.manual_seed(0)
    attn = GQAttention(config, 0)
    x_SD = torch.randn(5, 48)
    gamma_H = torch.tensor([0.25, 1.0, 0.5, 0.5, 0.1, 0.4])  # group 0 has an unclipped head, group 1 has none
    k_before = attn.k_proj.weight.detach().clone()
    with torch.no_grad():
        before = _head_logits(attn, x_SD)
        attn.clip_heads_(gamma_H)
        after = _head_logits(attn, x_SD)
    torch.testing.assert_close(after, before * gamma_H[:, None, None], rtol=1e-5, atol=1e-6)
    head_dim = config.gqa_head_dim
    assert torch.equal(attn.k_proj.weight[:head_dim], k_before[:head_dim])  # group 0 keeps its key
    torch.testing.assert_close(attn.k_proj.weight[head_dim:], k_before[head_dim:] * 0.5**0.5)  # sqrt(max gamma)


def test_muon_clip_clips_a_gqa_model() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("mixtral-debug"))
    optimizer = MuonClip(model, qk_clip_tau=100.0)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    max_logits = torch.full((layers, heads), 50.0)
    max_logits[1, 3] = 400.0  # one head of layer 1 over tau: gamma 1/4
    q_before = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    assert optimizer.qk_clip(max_logits) == 1
    q_after = model.model.layers[1].self_attn.q_proj.weight.detach()
    head_dim = model.config.gqa_head_dim
    rows = slice(3 * head_dim, 4 * head_dim)
    # head 3 shares KV head 1 with head 2 (unclipped), so the key stays and head 3's queries take the whole 1/4
    torch.testing.assert_close(q_after[rows], q_before[rows] * 0.25)
    assert torch.equal(q_after[: 3 * head_dim], q_before[: 3 * head_dim])


def test_the_worker_trains_the_mixtral_debug_preset(tmp_path: Path) -> None:
    cfg = RunConfig(
        steps=2,
        warmup_steps=1,
        decay_steps=1,
        seq_len=32,
        micro_batch_size=2,
        device="cpu",
        model_preset="mixtral-debug",
        aux_loss_alpha=0.02,
        checkpoint_dir=str(tmp_path),
    )
    out = io.StringIO()
    assert train(cfg, out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all(r["loss"] > 0 and r["max_attn_logit"] > 0 and r["aux_loss"] > 0 for r in lines)


def test_switch_training_reports_the_dropped_token_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []  # what rank 0 would patch into status.progress
    monkeypatch.setattr(loop, "reporter_from_env", lambda **_: StatusReporter(sent.append, min_interval_s=0))
    config = switch_routing(K2Config.from_preset("mixtral-debug"), capacity_factor=0.5)
    cfg = RunConfig(
        steps=1,
        warmup_steps=0,
        decay_steps=0,
        seq_len=32,
        micro_batch_size=2,
        device="cpu",
        model_preset=None,
        model_hf_config=config.to_hf_config(),
        aux_loss_alpha=SWITCH_AUX_LOSS_ALPHA,
        checkpoint_dir=str(tmp_path),
    )
    out = io.StringIO()
    assert train(cfg, out) == 0
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert 0.5 <= record["dropped_token_rate"] < 1  # capacity 0.5: at least half of the assignments dropped
    assert sent and sent[-1]["droppedTokenRate"] == round(record["dropped_token_rate"], 6)
    K2Training.model_validate({**example("k2training-debug.yaml"), "status": {"progress": sent[-1]}})
