"""The placement in force, as the operator's `<placement>-active` ConfigMap gives it to the serving ranks.

The file is the ExpertPlacement spec's JSON (`generation`, `numLayers`, `numExperts`, `ranks`, `slotsPerRank`,
`layers[].slots[rank][slot]`). Reading is pure; a file that is missing, unparsable or inconsistent raises
`ValueError` so the worker keeps serving the placement it already applied.
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


def parse_placement(document: dict[str, object]) -> ActivePlacement:
    spec = ExpertPlacementSpec.model_validate(document)
    problems = placement_problems(spec)
    if problems:
        raise ValueError("placement: " + "; ".join(problems))
    layers = sorted(spec.layers, key=lambda entry: entry.layer)
    tables = tuple(SlotTable.from_nested(entry.slots, spec.num_experts) for entry in layers)
    return ActivePlacement(spec.generation, tables)


def read_placement(path: str | Path) -> ActivePlacement:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"placement file {path}: {error}") from error
    return parse_placement(document)
