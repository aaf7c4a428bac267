"""Pure conversions between the API objects (k2_api) and the planner's plain inputs and outputs."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from k2_api import ExpertPlacement, K2Serving, ModelSpec, placement_problems
from k2_api.common import Condition, ConditionStatus
from k2_api.contract import moe_shape
from k2_api.serving import Eplb
from k2_eplb.planner import Decision, IntArray, PlacementState, Policy, Reason, Shape
from k2_eplb.rounds import Progress
from k2_eplb.validation import check_placement

PLANNED = "Planned"
"""The controller's condition on ExpertPlacement status: True when its last pass wrote spec, else False and why."""


def policy_from_spec(eplb: Eplb, num_slots: int) -> Policy:
    """The planner's knobs from K2Serving spec.eplb; `num_slots` (a group's slots over all MoE layers,
    `ExpertPlacementSpec.total_slots`) scales the move budget."""
    return Policy(
        enabled=eplb.enabled,
        window_seconds=float(eplb.window_seconds),
        min_improvement=eplb.min_improvement,
        max_moves=eplb.move_budget(num_slots),
        cooldown_seconds=float(eplb.cooldown_seconds),
    )


def bytes_per_expert(model: ModelSpec) -> int:
    """Bytes one expert copy moves, for a preset or an inline config (`k2_api.contract.expert_bytes`)."""
    return moe_shape(model).expert_bytes(model.dtype)


def desired_shape(serving: K2Serving) -> Shape:
    """The shape the serving's ranks expect: its model's MoE layers and experts, its ranks and slots per rank."""
    shape = moe_shape(serving.spec.model)
    slots = serving.spec.slots_per_rank(shape.n_routed_experts)
    return Shape(shape.num_moe_layers, shape.n_routed_experts, serving.spec.ranks_per_group, slots)


def placement_shape(placement: ExpertPlacement) -> Shape:
    spec = placement.spec
    return Shape(spec.num_layers, spec.num_experts, spec.ranks, spec.slots_per_rank)


def spec_of(decision: Decision, shape: Shape) -> dict[str, Any]:
    """The whole ExpertPlacement.spec (wire form) of a decision that writes a generation."""
    assert decision.writes and decision.placement_LGS is not None and decision.generation is not None
    return {
        "numLayers": shape.num_layers,
        "numExperts": shape.num_experts,
        "ranks": shape.ranks,
        "slotsPerRank": shape.slots_per_rank,
        "layers": layers_from_array(decision.placement_LGS),
        "generation": decision.generation,
        "reason": f"{'reshape' if decision.reason is Reason.RESHAPED else 'rebalance'}: {decision.message}",
    }


def invalid_placement(placement: ExpertPlacement) -> Decision | None:
    """InvalidPlacement when the spec in force cannot be served (for example written by hand with an expert missing
    from a layer, which the CRD's CEL rules allow, or two replicas of one expert on one GPU); None when it can."""
    spec = placement.spec
    problems = placement_problems(spec)
    if not problems:
        try:
            check_placement(
                placement_array(placement), spec.num_layers, spec.num_experts, (spec.ranks, spec.slots_per_rank)
            )
        except ValueError as error:
            problems = [str(error).removeprefix("current: ")]
    if not problems:
        return None
    return Decision(Reason.INVALID_PLACEMENT, f"generation {spec.generation} is invalid: {'; '.join(problems)}")


def placement_array(placement: ExpertPlacement) -> IntArray:
    """spec.layers as [L, G, S], rows ordered by layer index."""
    spec = placement.spec
    return np.array([spec.table(layer) for layer in range(spec.num_layers)], dtype=np.int64)


def layers_from_array(placement_LGS: IntArray) -> list[dict[str, Any]]:
    """[L, G, S] back to the wire form of spec.layers."""
    return [{"layer": layer, "slots": table.tolist()} for layer, table in enumerate(placement_LGS)]


def placement_state(placement: ExpertPlacement, last_rebalance_time: float | None) -> PlacementState:
    status = placement.status
    return PlacementState(
        placement_LGS=placement_array(placement),
        generation=placement.spec.generation,
        applied_generation=status.applied_generation if status else None,
        last_rebalance_time=last_rebalance_time,
        plan=Progress.from_status(status.rebalance_plan) if status else None,
        ranks_behind=ranks_behind(placement),
    )


def ranks_behind(placement: ExpertPlacement, shown: int = 4) -> tuple[str, ...]:
    """The rank pods in status.ranks that report no generation or one older than spec.generation (the first `shown`,
    then a count of the rest)."""
    reports = placement.status.ranks if placement.status else []
    behind = [r.pod for r in reports if r.generation is None or r.generation < placement.spec.generation]
    rest = len(behind) - shown
    return (*behind[:shown], f"{rest} more") if rest > 0 else tuple(behind)


def planned_condition(decision: Decision, previous: Condition | None, now: float, generation: int | None) -> Condition:
    """The Planned condition for `decision`; lastTransitionTime moves only when the status flips."""
    status = ConditionStatus.TRUE if decision.writes else ConditionStatus.FALSE
    transition = dt.datetime.fromtimestamp(int(now), tz=dt.UTC)
    if previous is not None and previous.status == status and previous.last_transition_time is not None:
        transition = previous.last_transition_time
    return Condition(
        type=PLANNED,
        status=status,
        reason=decision.reason.value,
        message=decision.message,
        last_transition_time=transition,
        observed_generation=generation,
    )


def status_fields(decision: Decision, placement: ExpertPlacement, now: float) -> dict[str, Any]:
    """Every status field the controller owns, in wire form (server-side apply drops owned fields left out: a
    decision without a plan, a reshape for example, clears status.rebalancePlan)."""
    observed = placement.status
    previous = next((c for c in observed.conditions if c.type == PLANNED), None) if observed else None
    fields: dict[str, Any] = {
        "predictedBalancedness": decision.predicted_balancedness
        if decision.writes
        else (observed.predicted_balancedness if observed else None),
        "movedExperts": decision.moved_experts if decision.writes else (observed.moved_experts if observed else 0),
        "movedBytes": decision.moved_bytes if decision.writes else (observed.moved_bytes if observed else 0),
        "measuredBalancedness": decision.measured_balancedness
        if decision.measured_balancedness is not None
        else (observed.measured_balancedness if observed else None),
        "rebalancePlan": decision.plan.to_status() if decision.plan is not None else None,
        "conditions": [planned_condition(decision, previous, now, placement.metadata.generation).to_dict()],
    }
    return {key: value for key, value in fields.items() if value is not None}


def observed_fields(placement: ExpertPlacement) -> dict[str, Any]:
    """The controller-owned status fields as they are now, in the same form as `status_fields`."""
    if placement.status is None:
        return {}
    wire = placement.status.to_dict()
    owned = ("predictedBalancedness", "movedExperts", "movedBytes", "measuredBalancedness", "rebalancePlan")
    fields = {key: wire[key] for key in owned if wire.get(key) is not None}
    planned = [c.to_dict() for c in placement.status.conditions if c.type == PLANNED]
    if planned:
        fields["conditions"] = planned
    return fields
