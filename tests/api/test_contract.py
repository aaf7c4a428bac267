"""k2_api.contract without torch: it imports no torch, its names do not collide, and its sizes are what it says.

The check against the real model (every preset built on the meta device) is tests/model/test_contract_bytes.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from k2_api import ModelSpec
from k2_api.common import DType, Preset
from k2_api.contract import (
    DEFAULT_SHAPE,
    PRESET_SHAPES,
    Annotations,
    Env,
    FieldManagers,
    Files,
    Labels,
    MetricLabels,
    Metrics,
    PortNames,
    Ports,
    TorchrunEnv,
    expert_bytes,
    moe_shape,
)

NAMESPACES = (Annotations, Env, FieldManagers, Files, Labels, MetricLabels, PortNames, Ports, TorchrunEnv)


def constants(namespace: type) -> dict[str, object]:
    return {name: value for name, value in vars(namespace).items() if name.isupper()}


def test_importing_the_contract_loads_no_torch() -> None:
    code = "import sys, k2_api.contract; print('torch' in sys.modules, 'k2_workers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda n: n.__name__)
def test_no_two_names_of_a_group_share_a_value(namespace: type) -> None:
    values = list(constants(namespace).values())
    assert values and len(values) == len(set(values))


def test_keys_live_under_the_api_group_and_env_names_under_k2() -> None:
    for value in (*constants(Labels).values(), *constants(Annotations).values()):
        assert isinstance(value, str) and value.split("/")[0].endswith("k2.ai")
    assert all(str(value).startswith("K2_") for value in constants(Env).values())
    assert Files.PLACEMENT_DIR.startswith(Files.CONFIG_DIR + "/")


def test_metrics_carry_the_rank_labels_and_prometheus_family_names() -> None:
    assert Metrics.EXPERT_TOKENS.name == "k2_expert_tokens_total"
    assert Metrics.EXPERT_TOKENS.family == "k2_expert_tokens"
    assert Metrics.EXPERT_TOKENS.labels == ("serving", "group", "rank", "layer", "expert")
    assert Metrics.SLOT_TOKENS.labels[-1] == MetricLabels.SLOT
    assert Metrics.EXPERT_WEIGHT_BYTES.labels == ("serving", "group", "rank", "source")


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (DType.FP32, 3 * 7168 * 2048 * 4),
        (DType.BF16, 3 * 7168 * 2048 * 2),
        # 2048 x 7168 in 128 x 128 blocks: 16 x 56 fp32 scales per matrix
        (DType.FP8, 3 * 7168 * 2048 + 3 * 16 * 56 * 4),
        ("fp8", 44_050_944),
    ],
)
def test_kimi_k2_expert_bytes(dtype: DType | str, expected: int) -> None:
    assert expert_bytes(7168, 2048, dtype) == expected
    assert PRESET_SHAPES[Preset.KIMI_K2].expert_bytes(dtype) == expected


def test_fp8_counts_a_partial_block_as_one_scale() -> None:
    assert expert_bytes(64, 32, DType.FP8) == 3 * 64 * 32 + 3 * 4
    assert expert_bytes(129, 128, DType.FP8) == 3 * 129 * 128 + 3 * 2 * 4


@pytest.mark.parametrize(("hidden", "intermediate"), [(0, 2048), (7168, -1)])
def test_expert_bytes_rejects_empty_experts(hidden: int, intermediate: int) -> None:
    with pytest.raises(ValueError, match="hidden_size, moe_intermediate_size"):
        expert_bytes(hidden, intermediate, DType.BF16)


def test_expert_bytes_rejects_an_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="fp16"):
        expert_bytes(64, 32, "fp16")


def test_every_preset_has_a_shape_with_moe_layers() -> None:
    assert set(PRESET_SHAPES) == set(Preset)
    assert all(shape.num_moe_layers >= 1 for shape in PRESET_SHAPES.values())
    assert PRESET_SHAPES[Preset.K2_DEBUG].num_moe_layers == 3


def test_moe_shape_of_a_preset_and_of_an_inline_config() -> None:
    assert moe_shape(ModelSpec.model_validate({"preset": "deepseek-v3"})) is PRESET_SHAPES[Preset.DEEPSEEK_V3]
    sparse = ModelSpec.model_validate(
        {"config": {"num_hidden_layers": 5, "n_routed_experts": 16, "num_experts_per_tok": 4}}
    )
    shape = moe_shape(sparse)
    assert (shape.num_hidden_layers, shape.n_routed_experts, shape.num_experts_per_tok) == (5, 16, 4)
    # Left out: the workers' defaults, which are Kimi-K2's.
    assert (
        (shape.first_k_dense_replace, shape.hidden_size)
        == (1, 7168)
        == (
            DEFAULT_SHAPE.first_k_dense_replace,
            DEFAULT_SHAPE.hidden_size,
        )
    )
    full = {"num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 2}
    small = moe_shape(ModelSpec.model_validate({"config": {**full, "hidden_size": 64, "moe_intermediate_size": 32}}))
    assert (small.num_moe_layers, small.expert_bytes(DType.FP32)) == (1, 3 * 64 * 32 * 4)
