"""k2_api.contract against the real model: every preset's MoE shape and bytes per routed expert, on the meta device."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

from k2_api.common import DType, Preset
from k2_api.contract import PRESET_SHAPES
from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.model.fp8 import FP8_DTYPE, quantize_fp8

TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP32: torch.float32}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@functools.cache
def meta_model(preset: Preset) -> K2ForCausalLM:
    """Built once per preset; `.to(dtype)` changes it in place, so each test sets the dtype it reads."""
    with torch.device("meta"):
        return K2ForCausalLM(K2Config.from_preset(preset.value))


def experts_of_each_moe_layer(model: nn.Module) -> list[nn.Module]:
    return [module for name, module in model.named_modules() if name.endswith("mlp.experts")]


def one_expert(experts: nn.Module) -> list[Tensor]:
    """gate_proj, up_proj and down_proj of slot 0 in the stacked expert parameters."""
    return [getattr(experts, name)[0] for name in PROJECTIONS]


@pytest.mark.parametrize("preset", list(Preset))
def test_the_contract_shape_is_the_model_config(preset: Preset) -> None:
    shape, config = PRESET_SHAPES[preset], K2Config.from_preset(preset.value)
    assert (shape.num_hidden_layers, shape.first_k_dense_replace) == (
        config.num_hidden_layers,
        config.first_k_dense_replace,
    )
    assert (shape.n_routed_experts, shape.num_experts_per_tok) == (config.n_routed_experts, config.num_experts_per_tok)
    assert (shape.hidden_size, shape.moe_intermediate_size) == (config.hidden_size, config.moe_intermediate_size)
    assert shape.num_moe_layers == len(config.moe_layer_indices)


@pytest.mark.parametrize("preset", list(Preset))
def test_the_model_has_the_contract_moe_layers_and_experts(preset: Preset) -> None:
    layers = experts_of_each_moe_layer(meta_model(preset))
    shape = PRESET_SHAPES[preset]
    assert len(layers) == shape.num_moe_layers
    assert {experts.gate_proj.shape[0] for experts in layers} == {shape.n_routed_experts}


@pytest.mark.parametrize("preset", list(Preset))
@pytest.mark.parametrize("dtype", [DType.BF16, DType.FP32])
def test_bytes_per_expert_are_the_parameter_bytes_of_one_routed_expert(preset: Preset, dtype: DType) -> None:
    experts = experts_of_each_moe_layer(meta_model(preset).to(TORCH_DTYPES[dtype]))[0]
    real = sum(w.numel() * w.element_size() for w in one_expert(experts))
    assert PRESET_SHAPES[preset].expert_bytes(dtype) == real


@pytest.mark.parametrize("preset", list(Preset))
def test_fp8_bytes_per_expert_are_what_the_fp8_format_stores(preset: Preset) -> None:
    """e4m3 weights and fp32 block scales, as k2_workers.model.fp8 quantises (and a FP8 checkpoint stores) them."""
    experts = experts_of_each_moe_layer(meta_model(preset))[0]
    stored = 0
    for weight in one_expert(experts):
        w_fp8, scale_inv = quantize_fp8(weight)
        assert w_fp8.dtype == FP8_DTYPE
        stored += w_fp8.numel() * w_fp8.element_size() + scale_inv.numel() * scale_inv.element_size()
    assert PRESET_SHAPES[preset].expert_bytes(DType.FP8) == stored
