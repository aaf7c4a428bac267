"""Mixtral for the operator and the EPLB controller: both take the MoE shape from the contract
(k2_api.contract.PRESET_SHAPES via moe_shape), and it is the shape the workers build."""

from __future__ import annotations

from pathlib import Path

import yaml

from k2_api import K2Serving
from k2_api.common import ModelSpec, Preset
from k2_api.contract import moe_shape
from k2_eplb.convert import bytes_per_expert, desired_shape
from k2_operator.builders import placement as placement_builder
from k2_workers.model import K2Config

EXAMPLE = Path(__file__).parents[2] / "examples" / "k2serving-mixtral-debug.yaml"


def example_serving() -> K2Serving:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update({"namespace": "ns1", "uid": "00000000-0000-4000-8000-000000000001", "generation": 1})
    return K2Serving.model_validate(body)


def test_operator_and_eplb_shapes_are_the_models() -> None:
    serving = example_serving()
    config = K2Config.from_preset("mixtral-debug")
    shape = desired_shape(serving)
    assert (shape.num_layers, shape.num_experts, shape.ranks, shape.slots_per_rank) == (3, 8, 2, 5)
    assert shape.num_layers == len(config.moe_layer_indices) and shape.num_experts == config.n_routed_experts
    assert placement_builder.desired_shape(serving) == {"numLayers": 3, "numExperts": 8, "ranks": 2, "slotsPerRank": 5}
    one_expert = 3 * config.hidden_size * config.moe_intermediate_size * 4  # fp32 gate, up and down
    assert bytes_per_expert(serving.spec.model) == one_expert


def test_mixtral_8x7b_shape_for_the_controllers() -> None:
    shape = moe_shape(ModelSpec(preset=Preset.MIXTRAL_8X7B))
    assert (shape.num_moe_layers, shape.n_routed_experts, shape.num_experts_per_tok) == (32, 8, 2)
    assert shape.expert_bytes("bf16") == 3 * 4096 * 14336 * 2
