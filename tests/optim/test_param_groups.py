"""Which K2 parameter goes to Muon, AdamW or nowhere."""

import pytest
import torch
from torch import nn

from k2_workers.optim import MuonClip, classify_parameter
from tests.optim.k2_debug import debug_model


def _param(*shape: int, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape), requires_grad=requires_grad)


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("model.embed_tokens.weight", (64, 8), "adamw"),
        ("lm_head.weight", (64, 8), "adamw"),
        ("model.norm.weight", (8,), "adamw"),
        ("model.layers.0.input_layernorm.weight", (8,), "adamw"),
        ("model.layers.0.self_attn.q_a_layernorm.weight", (4,), "adamw"),
        ("model.layers.0.self_attn.q_b_proj.bias", (12,), "adamw"),
        ("model.layers.0.self_attn.q_b_proj.weight", (12, 4), "muon"),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (6, 8), "muon"),
        ("model.layers.0.self_attn.o_proj.weight", (8, 8), "muon"),
        ("model.layers.0.mlp.gate_proj.weight", (16, 8), "muon"),
        ("model.layers.1.mlp.gate.weight", (4, 8), "muon"),
        ("model.layers.1.mlp.experts.gate_proj", (4, 16, 8), "muon"),
        ("model.layers.1.mlp.experts.down_proj", (4, 8, 16), "muon"),
        ("model.layers.1.mlp.shared_experts.up_proj.weight", (16, 8), "muon"),
        ("model.layers.1.mlp.gate.e_score_correction_bias", (4,), "frozen"),
    ],
)
def test_classify_parameter(name: str, shape: tuple[int, ...], kind: str) -> None:
    assert classify_parameter(name, _param(*shape)) == kind


def test_parameters_without_grad_are_frozen() -> None:
    assert classify_parameter("model.layers.0.self_attn.o_proj.weight", _param(8, 8, requires_grad=False)) == "frozen"


def test_k2_debug_parameters_are_split_as_the_paper_says() -> None:
    model = debug_model()
    opt = MuonClip(model, lr=1e-3, weight_decay=0.1)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    by_group = {g["name"]: {opt.param_names[p] for p in g["params"]} for g in opt.param_groups}
    names = dict(model.named_parameters())
    assert by_group["adamw"] == {n for n, p in names.items() if p.ndim == 1} | {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert by_group["muon"] == {n for n, p in names.items() if p.ndim >= 2} - {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    assert {
        "model.layers.1.mlp.experts.gate_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
    } <= by_group["muon"]
    buffers = {n for n, _ in model.named_buffers()}
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in buffers
