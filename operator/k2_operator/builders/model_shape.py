"""The MoE shape (MoE layers, routed experts) of a ModelSpec, without importing the workers (and so torch).

The preset numbers mirror `k2_workers.model.K2Config.from_preset`; a unit test checks they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2_api import ModelSpec, Preset


@dataclass(frozen=True)
class MoeShape:
    num_layers: int
    """Transformer layers, dense and MoE."""
    first_dense: int
    """Leading dense layers (first_k_dense_replace)."""
    num_experts: int
    """Routed experts per MoE layer."""
    top_k: int

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense

    def to_dict(self) -> dict[str, Any]:
        return {
            "numHiddenLayers": self.num_layers,
            "firstKDenseReplace": self.first_dense,
            "numMoeLayers": self.num_moe_layers,
            "numExperts": self.num_experts,
            "numExpertsPerToken": self.top_k,
        }


PRESET_SHAPES = {
    Preset.KIMI_K2: MoeShape(num_layers=61, first_dense=1, num_experts=384, top_k=8),
    Preset.DEEPSEEK_V3: MoeShape(num_layers=61, first_dense=3, num_experts=256, top_k=8),
    Preset.K2_DEBUG: MoeShape(num_layers=4, first_dense=1, num_experts=8, top_k=2),
}


def moe_shape(model: ModelSpec) -> MoeShape:
    if model.config is not None:
        config = model.config
        first = config.first_k_dense_replace if config.first_k_dense_replace is not None else 1
        return MoeShape(config.num_hidden_layers, first, config.n_routed_experts, config.num_experts_per_tok)
    assert model.preset is not None, "the API guarantees exactly one of preset or config"
    return PRESET_SHAPES[Preset(model.preset)]
