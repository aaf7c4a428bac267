"""K2Config: presets, the published config.json files, the transformers 5 form, and field-naming validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from k2_workers.model import PRESET_NAMES, K2Config

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


@pytest.mark.parametrize(
    ("fixture", "preset"), [("kimi-k2-instruct.config.json", "kimi-k2"), ("deepseek-v3.config.json", "deepseek-v3")]
)
def test_published_config_equals_preset(fixture: str, preset: str) -> None:
    from_file = K2Config.from_hf_config(_fixture(fixture))
    built_in = K2Config.from_preset(preset)
    for f in dataclasses.fields(K2Config):
        if f.name not in ("extra", "torch_dtype"):
            assert getattr(from_file, f.name) == getattr(built_in, f.name), f.name
    assert from_file.extra["quantization_config"]["weight_block_size"] == [128, 128]
    assert "transformers_version" not in from_file.extra


def test_kimi_k2_fields() -> None:
    c = K2Config.from_hf_config(_fixture("kimi-k2-instruct.config.json"))
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (384, 8, 1, 1)
    assert (c.num_attention_heads, c.first_k_dense_replace, c.routed_scaling_factor) == (64, 1, 2.827)
    assert c.rope_theta == 50000.0 and c.rope_scaling is not None and c.rope_scaling["factor"] == 32.0
    assert c.moe_layer_indices == list(range(1, 61))
    assert c.qk_head_dim == 192


@pytest.mark.parametrize("fixture", ["kimi-k2-instruct.config.json", "deepseek-v3.config.json"])
def test_to_hf_config_round_trips(fixture: str) -> None:
    original = _fixture(fixture)
    config = K2Config.from_hf_config(original)
    written = config.to_hf_config()
    assert K2Config.from_hf_config(written) == config
    for key, value in original.items():
        if key != "transformers_version":
            assert written[key] == value, key


def test_transformers5_rope_parameters_form() -> None:
    """transformers >= 5 writes rope_parameters (theta + scaling together) and num_mtp_layers."""
    hf = _fixture("kimi-k2-instruct.config.json")
    scaling = hf.pop("rope_scaling")
    hf["rope_parameters"] = {**scaling, "rope_type": "yarn", "rope_theta": hf.pop("rope_theta")}
    c = K2Config.from_hf_config(hf)
    assert c.rope_theta == 50000.0
    assert c.rope_scaling is not None and c.rope_scaling["factor"] == 32.0
    plain = _fixture("kimi-k2-instruct.config.json")
    del plain["rope_scaling"]
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert K2Config.from_hf_config(plain).rope_scaling is None


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_are_valid(name: str) -> None:
    c = K2Config.from_preset(name)
    assert c.num_experts_per_tok <= c.n_routed_experts


def test_debug_preset_is_tiny_and_complete() -> None:
    c = K2Config.from_preset("k2-debug")
    assert c.first_k_dense_replace >= 1 and c.num_hidden_layers > c.first_k_dense_replace
    assert c.n_routed_experts >= 8 and c.num_experts_per_tok >= 2 and c.n_shared_experts >= 1
    assert c.q_lora_rank is not None and c.rope_scaling is not None and c.rope_scaling["type"] == "yarn"


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="preset"):
        K2Config.from_preset("kimi-k3")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_experts_per_tok": 400}, "num_experts_per_tok"),
        ({"n_group": 5}, "n_group"),  # 384 % 5 != 0
        ({"n_group": 8, "topk_group": 9}, "topk_group"),
        ({"scoring_func": "tanh"}, "scoring_func"),
        ({"topk_method": "best"}, "topk_method"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"first_k_dense_replace": 70}, "first_k_dense_replace"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"n_group": 384, "topk_group": 8}, "n_group"),  # noaux_tc needs >= 2 experts per group
        ({"n_group": 8, "topk_group": 1, "num_experts_per_tok": 49}, "num_experts_per_tok"),  # 1 group of 48
        ({"rope_scaling": {"type": "ntk", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 4096}}, "factor"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
    ],
)
def test_inconsistent_values_name_the_field(overrides: dict[str, Any], field: str) -> None:
    hf = {**_fixture("kimi-k2-instruct.config.json"), **overrides}
    with pytest.raises(ValueError, match=field):
        K2Config.from_hf_config(hf)
    with pytest.raises(ValueError, match=field):
        K2Config(**overrides)
