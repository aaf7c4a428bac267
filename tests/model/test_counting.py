"""Scale facts: exact parameter counts of the full-size presets, built on the meta device."""

from __future__ import annotations

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM, activated_parameters, total_parameters


def _meta_counts(preset: str) -> tuple[int, int]:
    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.from_preset(preset))
    params = sum(p.numel() for p in model.parameters())
    router_biases = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return params, router_biases


def test_kimi_k2_has_1_026_408_209_408_parameters() -> None:
    params, router_biases = _meta_counts("kimi-k2")
    assert params == 1_026_408_209_408
    assert router_biases == 23_040
    config = K2Config.from_preset("kimi-k2")
    assert total_parameters(config) == 1_026_408_209_408
    assert total_parameters(config, include_router_bias=True) == 1_026_408_232_448


def test_kimi_k2_activates_32_861_477_888_parameters_per_token() -> None:
    assert activated_parameters(K2Config.from_preset("kimi-k2")) == 32_861_477_888


def test_deepseek_v3_has_671_026_404_352_parameters() -> None:
    params, router_biases = _meta_counts("deepseek-v3")
    assert params == 671_026_404_352
    assert router_biases == 58 * 256
    assert total_parameters(K2Config.from_preset("deepseek-v3")) == 671_026_404_352


@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_formula_matches_the_module_tree_of_small_variants(q_lora_rank: int | None) -> None:
    config = K2Config.from_preset("k2-debug")
    config.q_lora_rank = q_lora_rank
    config.n_shared_experts = 2
    config.first_k_dense_replace = 2
    model = K2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == total_parameters(config)
    moe_layers = config.num_hidden_layers - 2
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    unused = moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    assert activated_parameters(config) == total_parameters(config) - unused
