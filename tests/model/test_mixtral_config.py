"""The mixtral-8x7b preset: Mixtral's published config.json, its exact parameter counts (meta device), the
contract's MoE shape, and the validation of GQA fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_api.common import ModelSpec, Preset
from k2_api.contract import PRESET_SHAPES, moe_shape
from k2_workers.model import K2Config, K2ForCausalLM, activated_parameters, total_parameters

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED = json.loads((FIXTURES / "mixtral-8x7b-v0.1.config.json").read_text())


def test_published_config_equals_preset() -> None:
    assert K2Config.from_hf_config(PUBLISHED) == K2Config.from_preset("mixtral-8x7b")


def test_mixtral_fields() -> None:
    c = K2Config.from_preset("mixtral-8x7b")
    assert (c.attention_type, c.num_attention_heads, c.num_key_value_heads, c.gqa_head_dim) == ("gqa", 32, 8, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 2, 14336)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.routed_scaling_factor) == ("softmax", "greedy", True, 1)
    assert (c.first_k_dense_replace, c.n_shared_experts, c.rope_scaling, c.rope_theta) == (0, 0, None, 1e6)
    assert c.moe_layer_indices == list(range(32))


def test_to_hf_config_writes_mixtral_keys_and_round_trips() -> None:
    c = K2Config.from_preset("mixtral-8x7b")
    hf = c.to_hf_config()
    expected = {k: v for k, v in PUBLISHED.items() if k not in ("transformers_version", "output_router_logits")}
    assert {k: hf[k] for k in expected} == expected
    assert "n_routed_experts" not in hf and "kv_lora_rank" not in hf
    assert K2Config.from_hf_config(hf) == c


def test_transformers5_form_and_switch_fields_round_trip() -> None:
    """transformers 5 writes rope_parameters; a Switch-style config on Mixtral's layout keeps its routing keys."""
    hf5 = {k: v for k, v in PUBLISHED.items() if k != "rope_theta"}
    hf5["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    assert K2Config.from_hf_config(hf5) == K2Config.from_preset("mixtral-8x7b")
    switch = K2Config.from_hf_config({**PUBLISHED, "num_experts_per_tok": 1, "capacity_factor": 1.25})
    switch.norm_topk_prob = False
    again = K2Config.from_hf_config(switch.to_hf_config())
    assert again == switch and again.capacity_factor == 1.25 and not again.norm_topk_prob


def test_mixtral_8x7b_has_46_702_792_704_parameters() -> None:
    config = K2Config.from_preset("mixtral-8x7b")
    assert total_parameters(config) == 46_702_792_704
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 46_702_792_704


def test_mixtral_8x7b_activates_12_879_925_248_parameters_per_token() -> None:
    """2 of 8 experts per layer; attention, router, norms, both embeddings and the head included."""
    config = K2Config.from_preset("mixtral-8x7b")
    assert activated_parameters(config) == 12_879_925_248
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    total = sum(p.numel() for p in model.parameters())
    assert total - experts + experts * 2 // 8 == 12_879_925_248


@pytest.mark.parametrize("preset", [Preset.MIXTRAL_8X7B, Preset.MIXTRAL_DEBUG])
def test_contract_shape_is_what_the_workers_build(preset: Preset) -> None:
    """The operator and the EPLB controller read the MoE shape from the contract: it is the built model's."""
    config = K2Config.from_preset(preset.value)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    shape = moe_shape(ModelSpec(preset=preset))
    assert shape is PRESET_SHAPES[preset]
    assert shape.num_moe_layers == len(list(model.moe_blocks())) == config.num_hidden_layers
    assert (shape.n_routed_experts, shape.num_experts_per_tok) == (config.n_routed_experts, 2)
    for moe in model.moe_blocks():
        assert tuple(moe.experts.gate_proj.shape) == (8, shape.moe_intermediate_size, shape.hidden_size)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),  # does not divide 32 heads
        ({"head_dim": 7}, "head_dim"),
        ({"sliding_window": 0}, "sliding_window"),
        ({"n_shared_experts": 1}, "n_shared_experts"),  # Mixtral's layout has none
        ({"attention_type": "mha"}, "attention_type"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
    ],
)
def test_bad_gqa_values_name_the_field(overrides: dict[str, Any], field: str) -> None:
    fields = {**dataclasses.asdict(K2Config.from_preset("mixtral-8x7b")), **overrides}
    with pytest.raises(ValueError, match=f"^{field}:"):
        K2Config(**fields)


def test_mla_refuses_a_sliding_window_and_grouped_heads() -> None:
    with pytest.raises(ValueError, match=r"^num_key_value_heads:"):
        K2Config(num_key_value_heads=8)
    with pytest.raises(ValueError, match=r"^sliding_window:"):
        K2Config(sliding_window=128)


def test_left_out_keys_mean_what_transformers_mixtral_config_means() -> None:
    from transformers import MixtralConfig

    everything = K2Config.from_hf_config(MixtralConfig().to_dict())
    bare = K2Config.from_hf_config({"model_type": "mixtral"})
    everything = dataclasses.replace(everything, torch_dtype=bare.torch_dtype)  # MixtralConfig's dtype is None
    assert dataclasses.replace(bare, extra={}) == dataclasses.replace(everything, extra={})
    assert (bare.vocab_size, bare.moe_intermediate_size, bare.num_key_value_heads) == (32000, 14336, 8)
