"""The initial ExpertPlacement of a K2Serving, and the ConfigMap that carries the placement in force to the ranks.

Ranks read the placement from the `<placement>-active` ConfigMap (mounted; kubelet refreshes it in place), never
from ExpertPlacement.spec directly: the operator copies a generation there only once it is valid, so an invalid spec
(marked Invalid) leaves the previous placement in force.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from k2_api import ExpertPlacement, ExpertPlacementSpec, K2Serving, LayerPlacement, round_robin
from k2_api.contract import Files, moe_shape
from k2_operator.builders.common import Manifest, metadata

COMPONENT = "placement"
INITIAL_REASON = "initial: uniform load"


def placement_name(serving: K2Serving) -> str:
    """The owned ExpertPlacement has the serving's name (the EPLB controller's default too)."""
    name = serving.metadata.name
    assert name is not None
    return name


def active_config_name(placement_name: str) -> str:
    return f"{placement_name}-active"


def initial_layers(num_layers: int, num_experts: int, ranks: int, slots_per_rank: int) -> list[LayerPlacement]:
    """`k2_eplb.solver.solve` on uniform load; a round-robin table if the solver is unavailable."""
    try:
        from k2_eplb.solver import solve
    except ImportError:  # pragma: no cover - the solver ships with this distribution
        return round_robin(num_layers, num_experts, ranks, slots_per_rank)
    placement_LGS = solve(np.ones((num_layers, num_experts)), ranks, slots_per_rank)
    return [LayerPlacement(layer=layer, slots=table.tolist()) for layer, table in enumerate(placement_LGS)]


def desired_shape(serving: K2Serving) -> dict[str, int]:
    """numLayers, numExperts, ranks and slotsPerRank the serving's ranks expect."""
    shape = moe_shape(serving.spec.model)
    return {
        "numLayers": shape.num_moe_layers,
        "numExperts": shape.n_routed_experts,
        "ranks": serving.spec.ranks_per_group,
        "slotsPerRank": serving.spec.slots_per_rank(shape.n_routed_experts),
    }


def expert_placement(serving: K2Serving, generation: int = 1) -> Manifest:
    """The ExpertPlacement a new serving starts with (or one whose shape no longer matches the spec)."""
    shape = desired_shape(serving)
    layers = initial_layers(shape["numLayers"], shape["numExperts"], shape["ranks"], shape["slotsPerRank"])
    spec = ExpertPlacementSpec.model_validate(
        {**shape, "layers": [layer.to_dict() for layer in layers], "generation": generation, "reason": INITIAL_REASON}
    )
    return {
        "apiVersion": ExpertPlacement.model_fields["api_version"].default,
        "kind": ExpertPlacement.KIND,
        "metadata": metadata(serving, placement_name(serving), COMPONENT),
        "spec": spec.to_dict(),
    }


def active_document(spec: ExpertPlacementSpec) -> dict[str, Any]:
    return {
        "generation": spec.generation,
        "numLayers": spec.num_layers,
        "numExperts": spec.num_experts,
        "ranks": spec.ranks,
        "slotsPerRank": spec.slots_per_rank,
        "layers": [layer.to_dict() for layer in sorted(spec.layers, key=lambda entry: entry.layer)],
    }


def active_config_map(placement: ExpertPlacement) -> Manifest:
    """The placement in force: written only for a valid spec, so it keeps the last valid generation."""
    name = placement.metadata.name
    assert name is not None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(placement, active_config_name(name), COMPONENT),
        "data": {Files.PLACEMENT: json.dumps(active_document(placement.spec), separators=(",", ":"))},
    }


def active_generation(config_map: dict[str, Any] | None) -> int | None:
    """The generation a `<placement>-active` ConfigMap holds (None when absent or unreadable)."""
    if config_map is None:
        return None
    try:
        generation = json.loads(config_map.get("data", {}).get(Files.PLACEMENT, ""))["generation"]
    except (ValueError, KeyError, TypeError):
        return None
    return int(generation) if isinstance(generation, int) else None
