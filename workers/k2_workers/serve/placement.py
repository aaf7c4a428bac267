"""The placement in force, as the operator's `<placement>-active` ConfigMap gives it to the serving ranks.

The file is the ExpertPlacement spec's JSON (`generation`, `numLayers`, `numExperts`, `ranks`, `slotsPerRank`,
`layers[].slots[rank][slot]`). Reading is pure; a file that is missing, unparsable or inconsistent, or whose shape
is not the group's (`GroupShape`: the model's MoE layers and experts, the group's ranks and slots), raises
`ValueError` so the worker keeps serving the placement it already applied. Rank 0 checks the shape before it
sends a placement to any other rank: a follower never receives tables it cannot apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from k2_api import ExpertPlacementSpec, placement_problems
from k2_workers.parallel import SlotTable


@dataclass(frozen=True)
class ActivePlacement:
    generation: int
    tables: tuple[SlotTable, ...]  # one per MoE layer, in layer order

    @property
    def num_experts(self) -> int:
        return self.tables[0].num_experts

    @property
    def num_ranks(self) -> int:
        return self.tables[0].num_ranks

    @property
    def slots_per_rank(self) -> int:
        return self.tables[0].slots_per_rank

    @classmethod
    def round_robin(cls, num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int) -> ActivePlacement:
        """Generation 0: what a worker serves before the operator's placement reaches it."""
        table = SlotTable.round_robin(num_experts, num_ranks, slots_per_rank)
        return cls(0, (table,) * num_layers)


@dataclass(frozen=True)
class GroupShape:
    """What a placement must match to run on this group."""

    num_layers: int  # MoE layers of the model
    num_experts: int  # routed experts per layer
    num_ranks: int
    slots_per_rank: int


def shape_problems(placement: ActivePlacement, shape: GroupShape) -> list[str]:
    """How `placement` differs from the group's shape; empty when it fits."""
    found = {
        "numLayers": (len(placement.tables), shape.num_layers),
        "numExperts": (placement.num_experts, shape.num_experts),
        "ranks": (placement.num_ranks, shape.num_ranks),
        "slotsPerRank": (placement.slots_per_rank, shape.slots_per_rank),
    }
    return [f"{name} is {got}, the group has {want}" for name, (got, want) in found.items() if got != want]


def parse_placement(document: dict[str, object], shape: GroupShape | None = None) -> ActivePlacement:
    spec = ExpertPlacementSpec.model_validate(document)
    problems = placement_problems(spec)
    if problems:
        raise ValueError("placement: " + "; ".join(problems))
    layers = sorted(spec.layers, key=lambda entry: entry.layer)
    tables = tuple(SlotTable.from_nested(entry.slots, spec.num_experts) for entry in layers)
    placement = ActivePlacement(spec.generation, tables)
    if shape is not None:
        check_shape(placement, shape)
    return placement


def check_shape(placement: ActivePlacement, shape: GroupShape) -> None:
    """ValueError naming each field of `placement` that does not fit the group."""
    mismatch = shape_problems(placement, shape)
    if mismatch:
        raise ValueError(f"placement generation {placement.generation} does not fit the group: " + "; ".join(mismatch))


def read_placement(path: str | Path, shape: GroupShape | None = None) -> ActivePlacement:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"placement file {path}: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"placement file {path}: expected a JSON object")
    return parse_placement(document, shape)
