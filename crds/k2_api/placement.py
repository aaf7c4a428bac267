"""ExpertPlacement: which logical expert sits in which slot of which rank, for every MoE layer.

The EPLB controller writes the spec (bumping `generation`); serving ranks load the experts of their slots and report
the generation they applied in status. CEL in the CRD rejects wrong shapes and out-of-range ids; whether every expert
keeps a replica in every layer costs too much for CEL, so `placement_problems` checks it and the operator marks the
placement Invalid (the previous placement stays in force).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from k2_api.common import ApiModel, Condition, Resource, cel, conditions_field

KIND = "ExpertPlacement"
PLURAL = "expertplacements"
SINGULAR = "expertplacement"
SHORT_NAMES = ("xp",)

# List bounds keep the CEL rules under the API server's cost budget (and the object far below etcd's size limit).
MAX_LAYERS = 128
MAX_RANKS = 256
MAX_SLOTS_PER_RANK = 64
MAX_EXPERTS = 4096


class PlacementConditionType(enum.StrEnum):
    APPLIED = "Applied"
    APPLYING = "Applying"
    INVALID = "Invalid"


ExpertId = Annotated[int, Field(ge=0, lt=MAX_EXPERTS)]
RankSlots = Annotated[list[ExpertId], Field(max_length=MAX_SLOTS_PER_RANK)]


class LayerPlacement(ApiModel):
    """The slot table of one MoE layer."""

    layer: int = Field(
        ge=0,
        lt=MAX_LAYERS,
        description="0-based index among the MoE layers (model layer first_k_dense_replace + layer).",
    )
    slots: list[RankSlots] = Field(
        max_length=MAX_RANKS,
        description="slots[rank][slot] = logical expert id in that slot: spec.ranks rows of spec.slotsPerRank ids.",
    )


_SHAPE_MESSAGE = "spec.layers[*].slots must have spec.ranks rows of spec.slotsPerRank expert ids each"
_RANGE_MESSAGE = "spec.layers[*].slots: every expert id must be in [0, spec.numExperts)"


class ExpertPlacementSpec(ApiModel):
    """Desired placement of logical experts onto the slots of the expert-parallel ranks."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.ranks * self.slotsPerRank >= self.numExperts",
                    "spec.slotsPerRank: spec.ranks x spec.slotsPerRank slots cannot hold every one of spec.numExperts "
                    "experts",
                    field_path=".slotsPerRank",
                ),
                cel(
                    "self.layers.size() == self.numLayers",
                    "spec.layers must have exactly spec.numLayers entries",
                    field_path=".layers",
                ),
                cel(
                    "self.layers.all(l, l.layer < self.numLayers)",
                    "spec.layers[*].layer must be < spec.numLayers",
                    field_path=".layers",
                ),
                cel(
                    "self.layers.all(l, l.slots.size() == self.ranks && l.slots.all(r, r.size() == self.slotsPerRank))",
                    _SHAPE_MESSAGE,
                    field_path=".layers",
                ),
                cel(
                    "self.layers.all(l, l.slots.all(r, r.size() == 0 || r.max() < self.numExperts))",
                    _RANGE_MESSAGE,
                    field_path=".layers",
                ),
            ]
        }
    )

    num_layers: int = Field(ge=1, le=MAX_LAYERS, description="MoE layers of the model.")
    num_experts: int = Field(ge=1, le=MAX_EXPERTS, description="Routed (logical) experts per MoE layer.")
    ranks: int = Field(ge=1, le=MAX_RANKS, description="Expert-parallel ranks of one group.")
    slots_per_rank: int = Field(ge=1, le=MAX_SLOTS_PER_RANK, description="Expert slots on each rank.")
    layers: list[LayerPlacement] = Field(
        max_length=MAX_LAYERS,
        description="One slot table per MoE layer, keyed by layer.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["layer"]},
    )
    generation: int = Field(
        default=1, ge=1, description="Placement version; the EPLB controller bumps it with every new placement."
    )
    reason: str | None = Field(
        default=None, max_length=1024, description="Why this placement was made (e.g. initial, rebalance)."
    )

    @model_validator(mode="after")
    def _cel_rules(self) -> ExpertPlacementSpec:
        problems = shape_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def total_slots(self) -> int:
        """Expert slots of one group over all its MoE layers: what `spec.eplb.maxMovesFraction` is a fraction of."""
        return self.num_layers * self.ranks * self.slots_per_rank

    def table(self, layer: int) -> list[list[int]]:
        """slots[rank][slot] of one MoE layer."""
        for entry in self.layers:
            if entry.layer == layer:
                return entry.slots
        raise KeyError(f"spec.layers has no layer {layer}")


def shape_problems(spec: ExpertPlacementSpec) -> list[str]:
    """The checks the CRD's CEL rules make: slot count, layer count, table shape, id range."""
    problems: list[str] = []
    if spec.ranks * spec.slots_per_rank < spec.num_experts:
        problems.append(
            f"spec.slotsPerRank: spec.ranks x spec.slotsPerRank = {spec.ranks * spec.slots_per_rank} slots cannot "
            f"hold every one of spec.numExperts = {spec.num_experts} experts"
        )
    indices = [entry.layer for entry in spec.layers]
    if len(indices) != spec.num_layers:
        problems.append(f"spec.layers must have exactly spec.numLayers = {spec.num_layers} entries, got {len(indices)}")
    if len(set(indices)) != len(indices):
        problems.append("spec.layers[*].layer must be unique")
    if any(index >= spec.num_layers for index in indices):
        problems.append(f"spec.layers[*].layer must be < spec.numLayers = {spec.num_layers}")
    for entry in spec.layers:
        if len(entry.slots) != spec.ranks or any(len(row) != spec.slots_per_rank for row in entry.slots):
            problems.append(f"{_SHAPE_MESSAGE} (layer {entry.layer})")
        if any(not 0 <= e < spec.num_experts for row in entry.slots for e in row):
            problems.append(f"{_RANGE_MESSAGE} (layer {entry.layer})")
    return problems


def missing_experts(spec: ExpertPlacementSpec) -> dict[int, list[int]]:
    """Layer -> logical experts with no replica in that layer (only layers that miss some)."""
    missing: dict[int, list[int]] = {}
    for entry in spec.layers:
        present = {e for row in entry.slots for e in row}
        absent = [e for e in range(spec.num_experts) if e not in present]
        if absent:
            missing[entry.layer] = absent
    return missing


def placement_problems(spec: ExpertPlacementSpec) -> list[str]:
    """Every reason to mark the placement Invalid; empty when it can be applied.

    Includes the rule CEL cannot afford: every expert has at least one replica in every layer.
    """
    problems = shape_problems(spec)
    for layer, absent in sorted(missing_experts(spec).items()):
        shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
        problems.append(f"spec.layers[layer={layer}].slots: experts without a replica: {shown}")
    return problems


def round_robin(num_layers: int, num_experts: int, ranks: int, slots_per_rank: int) -> list[LayerPlacement]:
    """A valid placement without load data: slot i (rank-major) holds expert i mod numExperts, in every layer."""
    if ranks * slots_per_rank < num_experts:
        raise ValueError(f"ranks x slotsPerRank = {ranks * slots_per_rank} cannot hold {num_experts} experts")
    table = [[(r * slots_per_rank + s) % num_experts for s in range(slots_per_rank)] for r in range(ranks)]
    return [LayerPlacement(layer=layer, slots=[list(row) for row in table]) for layer in range(num_layers)]


class RankReport(ApiModel):
    """What one rank pod reports: the placement generation it serves with."""

    pod: str = Field(min_length=1, max_length=253, description="The rank's pod.")
    group: int | None = Field(default=None, ge=0, description="Its expert-parallel group (label k2.ai/group).")
    generation: int | None = Field(
        default=None, ge=0, description="spec.generation it serves with (none: it has not reported one yet)."
    )


class RebalancePlan(ApiModel):
    """The EPLB controller's plan in rounds: when one rebalance's move budget cannot reach the balance target, it
    writes a sequence of generations, each within the budget, each after the previous one is applied by every rank.

    Only the progress is stored: each round re-derives the rest of the plan from the placement in force and the newest
    load, so the plan survives a controller restart and a load shift replans from where it is."""

    round: int = Field(ge=1, description="Round that spec.generation holds (1-based).")
    rounds: int = Field(
        ge=1, description="Rounds of the plan as last planned (round == rounds: the last round is written)."
    )
    generation: int = Field(ge=1, description="spec.generation this round wrote.")
    predicted_balancedness: float = Field(
        ge=0, le=1, description="Mean/max GPU load predicted once the plan's last round is applied."
    )
    target_balancedness: float = Field(
        ge=0, le=1, description="What the plan aims at: the fresh solve's balancedness minus the tolerance."
    )
    moves_per_round: int | None = Field(
        default=None, ge=0, description="The move budget of each round (expert copies; none: unbounded)."
    )


class ExpertPlacementStatus(ApiModel):
    """What the serving ranks did with the placement."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the operator last validated."
    )
    applied_generation: int | None = Field(
        default=None, ge=0, description="spec.generation that every rank of every group has applied."
    )
    applied_ranks: int = Field(default=0, ge=0, description="Ranks (over all groups) running spec.generation.")
    total_ranks: int = Field(default=0, ge=0, description="Ranks (over all groups) that must apply it.")
    ranks: list[RankReport] = Field(
        default_factory=list,
        max_length=MAX_RANKS * 64,
        description="Every running rank pod and the generation it reports, sorted by pod name.",
    )
    predicted_balancedness: float | None = Field(
        default=None, ge=0, le=1, description="Mean/max GPU load the planner predicted for spec (1 is perfect)."
    )
    measured_balancedness: float | None = Field(
        default=None, ge=0, le=1, description="Mean/max GPU load measured while the applied placement served."
    )
    moved_experts: int = Field(default=0, ge=0, description="Expert copies moved to apply the last generation.")
    moved_bytes: int = Field(default=0, ge=0, description="Bytes of expert weights moved for the last generation.")
    last_applied_time: datetime | None = Field(default=None, description="When the last generation became Applied.")
    rebalance_plan: RebalancePlan | None = Field(
        default=None, description="Progress of the EPLB controller's plan in rounds (written by the controller)."
    )
    conditions: list[Condition] = conditions_field("Applied, Applying, Invalid")


class ExpertPlacement(Resource):
    """An ExpertPlacement manifest: `ExpertPlacement.model_validate(body)` accepts what the API server returns."""

    KIND: ClassVar[str] = KIND
    PLURAL: ClassVar[str] = PLURAL
    SINGULAR: ClassVar[str] = SINGULAR
    SHORT_NAMES: ClassVar[tuple[str, ...]] = SHORT_NAMES

    kind: Literal["ExpertPlacement"] = "ExpertPlacement"
    spec: ExpertPlacementSpec
    status: ExpertPlacementStatus | None = None
