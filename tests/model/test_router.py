"""Routers, the Switch auxiliary loss and the loss-free bias update on hand-made cases."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM, loss_free_bias_update, switch_aux_loss, update_router_biases
from k2_workers.model.router import route


def _config(**overrides: Any) -> K2Config:
    fields: dict[str, Any] = {
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
    }
    fields.update(overrides)
    return K2Config(**fields)


def _sorted(routing_ids: torch.Tensor, weights: torch.Tensor) -> tuple[list[int], list[float]]:
    order = routing_ids[0].argsort()
    return routing_ids[0, order].tolist(), weights[0, order].tolist()


def test_softmax_topk_router() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    normalised = route(logits, _config(scoring_func="softmax", topk_method="greedy"))
    ids, weights = _sorted(normalised.expert_ids_TK, normalised.expert_weights_TK)
    assert ids == [0, 1]
    assert weights == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], rel=1e-6)

    raw = route(
        logits, _config(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=2.0)
    )
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.0, -1.0))
    ids, weights = _sorted(raw.expert_ids_TK, raw.expert_weights_TK)
    assert weights == pytest.approx([2 * math.exp(2) / z, 2 * math.exp(1) / z], rel=1e-6)
    torch.testing.assert_close(raw.probs_TE, logits.softmax(-1))


def test_noaux_tc_bias_chooses_but_does_not_weigh() -> None:
    logits = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    bias = torch.tensor([1.0, 0.0, 0.0, 0.0])
    unbiased = route(logits, _config(routed_scaling_factor=2.0))
    assert _sorted(unbiased.expert_ids_TK, unbiased.expert_weights_TK)[0] == [2, 3]
    biased = route(logits, _config(routed_scaling_factor=2.0), bias)
    ids, weights = _sorted(biased.expert_ids_TK, biased.expert_weights_TK)
    assert ids == [0, 3]
    s0, s3 = 0.5, 1 / (1 + math.exp(-2))
    assert weights == pytest.approx([2 * s0 / (s0 + s3), 2 * s3 / (s0 + s3)], rel=1e-6)


def test_noaux_tc_group_limited_choice() -> None:
    """Groups scored by the sum of their top-2 biased scores; the best single expert (0) is in a losing group."""
    scores = torch.tensor([[0.9, 0.1, 0.6, 0.58, 0.55, 0.55, 0.2, 0.2]])
    logits = torch.log(scores / (1 - scores))
    config = _config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    routing = route(logits, config)
    assert sorted(routing.expert_ids_TK[0].tolist()) in ([2, 3, 4], [2, 3, 5])
    flat = route(logits, _config(n_routed_experts=8, num_experts_per_tok=3))
    assert sorted(flat.expert_ids_TK[0].tolist()) == [0, 2, 3]


def test_switch_aux_loss_hand_made() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.7, 0.3]: alpha · 2 · 0.7
    assert switch_aux_loss(probs, ids, alpha=0.01).item() == pytest.approx(0.014)
    uniform = torch.full((6, 3), 1 / 3)
    assert switch_aux_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]), alpha=0.5).item() == pytest.approx(
        0.5
    )
    # top-2: f counts assignments out of T·K
    ids2 = torch.tensor([[0, 1], [0, 1]])
    assert switch_aux_loss(probs, ids2).item() == pytest.approx(2 * (0.5 * 0.7 + 0.5 * 0.3))


def test_switch_aux_loss_gradient_reaches_the_router() -> None:
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).train()
    model(torch.randint(0, 258, (2, 16)))
    model.aux_loss().backward()
    assert model.model.layers[1].mlp.gate.weight.grad is not None
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_loss_free_bias_update_hand_made() -> None:
    bias = torch.zeros(4)
    loss_free_bias_update(bias, torch.tensor([10, 2, 4, 4]), u=1e-3)
    # sign(mean 5 - load) = [-1, 1, 1, 1]; recentred by the mean 0.0005
    torch.testing.assert_close(bias, torch.tensor([-0.0015, 0.0005, 0.0005, 0.0005]))
    assert abs(bias.sum().item()) < 1e-9
    loss_free_bias_update(bias, torch.tensor([5, 5, 5, 5]), u=1e-3)  # balanced: unchanged
    torch.testing.assert_close(bias, torch.tensor([-0.0015, 0.0005, 0.0005, 0.0005]))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        loss_free_bias_update(bias, torch.ones(3))


def test_expert_token_counts_and_model_bias_update() -> None:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-debug")
    model = K2ForCausalLM(config)
    model(torch.randint(0, config.vocab_size, (2, 64)))
    counts = model.expert_token_counts()
    assert counts.shape == (config.num_hidden_layers - config.first_k_dense_replace, config.n_routed_experts)
    assert counts.sum(dim=1).tolist() == [2 * 64 * config.num_experts_per_tok] * counts.shape[0]

    biases = update_router_biases(model, counts, u=0.01)
    load = counts.float()
    expected = 0.01 * torch.sign(load.mean(1, keepdim=True) - load)
    expected -= expected.mean(1, keepdim=True)
    torch.testing.assert_close(biases, expected)
    stored = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert stored is not None
    torch.testing.assert_close(stored, expected[0])
    with pytest.raises(ValueError, match="tokens_per_expert_LE"):
        update_router_biases(model, counts[:, :-1])
    torch.testing.assert_close(stored, expected[0])  # a refused update changes nothing


def test_routing_stays_fp32_under_bf16_autocast() -> None:
    config = K2Config.from_preset("k2-debug")
    model = K2ForCausalLM(config)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(10, config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = gate(x)
        out = model(torch.randint(0, config.vocab_size, (2, 8)))
    assert routing.expert_weights_TK.dtype == torch.float32
    assert torch.equal(routing.expert_ids_TK, gate(x).expert_ids_TK)
    assert out.logits.dtype == torch.bfloat16
