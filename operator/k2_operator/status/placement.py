"""Validation and status of an ExpertPlacement: Invalid, Applying, Applied, from the spec and the ranks' reports.

How ranks report: each serving rank sets the annotation `Annotations.APPLIED_GENERATION` (k2_api.contract) on its
own Pod once it serves with that generation (its Role allows `get`/`patch` on exactly the rank pods). The operator
counts the running rank pods of the owning K2Serving that report the generation in force and writes appliedRanks,
totalRanks and appliedGeneration (the generation every rank runs) through the status subresource.

The generation in force is the last valid one, kept in the `<name>-active` ConfigMap the ranks mount; an invalid
spec is marked Invalid and never copied there, so the previous placement stays in force.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from k2_api import ExpertPlacementSpec, PlacementConditionType, placement_problems
from k2_api.contract import Annotations, Labels
from k2_operator.conditions import Desired, merge, rfc3339
from k2_operator.status.kstatus import KSTATUS_TYPES, State, Summary, kstatus_conditions

P = PlacementConditionType
CONDITION_TYPES = tuple(t.value for t in PlacementConditionType) + KSTATUS_TYPES
OWNED_FIELDS = ("observedGeneration", "appliedGeneration", "appliedRanks", "totalRanks", "ranks", "lastAppliedTime")


def problems(spec: dict[str, Any]) -> list[str]:
    """Why the spec cannot be applied (empty when it can)."""
    try:
        parsed = ExpertPlacementSpec.model_validate(spec)
    except ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    return placement_problems(parsed)


@dataclass(frozen=True)
class PlacementPlan:
    valid: bool
    in_force: int | None
    """spec.generation of the placement in force (written to the active ConfigMap when valid)."""
    status: dict[str, Any]


def reported_generation(pod: dict[str, Any]) -> int | None:
    value = pod.get("metadata", {}).get("annotations", {}).get(Annotations.APPLIED_GENERATION)
    return int(value) if value is not None and value.isdigit() else None


def rank_reports(running: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """status.ranks: each running rank pod, its group and the generation it reports, sorted by pod name."""
    reports = []
    for pod in sorted(running, key=lambda p: str(p["metadata"].get("name", ""))):
        if not pod["metadata"].get("name"):
            continue
        group = pod["metadata"].get("labels", {}).get(Labels.GROUP, "")
        reports.append(
            {
                "pod": pod["metadata"]["name"],
                "group": int(group) if group.isdigit() else None,
                "generation": reported_generation(pod),
            }
        )
    return reports


def summary(problems_found: list[str], applied: bool, total_ranks: int, in_force: int | None, progress: str) -> Summary:
    """Where the placement stands for kstatus: an invalid spec stalls it (only a new spec can fix it), no rank to
    apply it (the serving suspended or gone) leaves nothing to do (Ready), else Ready once every rank runs the
    generation in force."""
    if problems_found:
        return Summary(State.STALLED, "InvalidSpec", "; ".join(problems_found)[:4096])
    if total_ranks == 0:
        message = f"no rank to apply generation {in_force} (its K2Serving is suspended or gone)"
        return Summary(State.READY, "NoRanks", message)
    if applied:
        return Summary(State.READY, "AllRanksApplied", progress)
    return Summary(State.RECONCILING, "RanksLoading", progress)


def plan(
    placement: dict[str, Any],
    active_generation: int | None,
    rank_pods: list[dict[str, Any]],
    total_ranks: int,
    now: dt.datetime,
) -> PlacementPlan:
    spec, previous = placement.get("spec", {}), placement.get("status", {}) or {}
    generation = placement["metadata"].get("generation")
    found = problems(spec)
    valid = not found
    in_force = int(spec["generation"]) if valid else active_generation
    running = [p for p in rank_pods if p.get("status", {}).get("phase") == "Running"]
    applied_ranks = sum(1 for p in running if in_force is not None and reported_generation(p) == in_force)
    applied_generation = previous.get("appliedGeneration")
    last_applied = previous.get("lastAppliedTime")
    if in_force is not None and total_ranks > 0 and applied_ranks >= total_ranks and applied_generation != in_force:
        applied_generation = in_force
        last_applied = rfc3339(now)
    applied = in_force is not None and applied_generation == in_force
    progress = f"{applied_ranks}/{total_ranks} ranks run generation {in_force}"
    desired = [
        Desired(P.INVALID, not valid, "InvalidSpec" if found else "Valid", "; ".join(found)[:4096]),
        Desired(P.APPLIED, applied, "AllRanksApplied" if applied else "NotAllRanksApplied", progress),
        Desired(P.APPLYING, in_force is not None and not applied, "RanksLoading" if not applied else "Idle", progress),
    ]
    desired += kstatus_conditions(summary(found, applied, total_ranks, in_force, progress))
    status = {
        "observedGeneration": generation,
        "appliedGeneration": applied_generation,
        "appliedRanks": applied_ranks,
        "totalRanks": total_ranks,
        "ranks": rank_reports(running),
        "lastAppliedTime": last_applied,
        "conditions": merge(previous.get("conditions", []), desired, generation, now),
    }
    return PlacementPlan(valid=valid, in_force=in_force, status=status)
