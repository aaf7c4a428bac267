"""Group readiness, the group-by-group rollout decision and the status of a K2Serving, from its observed children
and each group's gang plan (`k2_operator.gang`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from k2_api import K2Serving, ServingConditionType
from k2_api.contract import Labels
from k2_operator.builders.placement import placement_name
from k2_operator.builders.serving import endpoint, rank_selector
from k2_operator.conditions import Desired, find, merge, rfc3339
from k2_operator.gang import GangPlan
from k2_operator.status.kstatus import KSTATUS_TYPES, State, Summary, kstatus_conditions

S = ServingConditionType
CONDITION_TYPES = tuple(t.value for t in ServingConditionType) + KSTATUS_TYPES
OWNED_FIELDS = (
    "observedGeneration",
    "groups",
    "readyGroups",
    "updatedGroups",
    "readyRanks",
    "selector",
    "endpoint",
    "placementName",
    "placementGeneration",
    "balancedness",
    "groupStatuses",
)


@dataclass(frozen=True)
class GroupState:
    index: int
    ready_ranks: int
    ready: bool
    """Every rank ready."""
    outdated: bool
    """Some rank still runs an older pod template (or the StatefulSet has not caught up with its spec yet)."""
    settled: bool
    """The StatefulSet controller has observed the latest spec, so `outdated` can be trusted."""
    gang: GangPlan | None = None
    """The group's gang plan of this reconcile: restarts, backoff, whether it is re-forming."""

    @property
    def restarting(self) -> bool:
        return self.gang is not None and self.gang.restarting


def group_state(
    index: int, stateful_set: dict[str, Any] | None, ranks_per_group: int, gang: GangPlan | None = None
) -> GroupState:
    """A group is ready when its StatefulSet counts every rank ready and no gang restart is under way (a broken
    group's ranks may still look ready for a moment)."""
    if stateful_set is None:
        return GroupState(index, 0, ready=False, outdated=False, settled=False, gang=gang)
    status = stateful_set.get("status", {})
    settled = status.get("observedGeneration") == stateful_set["metadata"].get("generation")
    ready_ranks = int(status.get("readyReplicas", 0) or 0)
    replicas = int(stateful_set.get("spec", {}).get("replicas", 0) or 0)
    updated = int(status.get("updatedReplicas", 0) or 0)
    outdated = settled and replicas > 0 and updated < replicas
    restarting = gang is not None and gang.restarting
    ready = ready_ranks >= ranks_per_group and not restarting
    return GroupState(index, ready_ranks, ready=ready, outdated=outdated, settled=settled, gang=gang)


def group_status(group: GroupState) -> dict[str, Any]:
    """One entry of status.groupStatuses (only the fields that have a value)."""
    entry: dict[str, Any] = {
        "group": group.index,
        "ready": group.ready,
        "readyRanks": group.ready_ranks,
        "restarting": group.restarting,
        "restarts": 0,
    }
    if group.gang is None:
        return entry
    record = group.gang.record
    entry["restarts"] = record.restarts
    if record.restarted_at is not None:
        entry["lastRestartTime"] = rfc3339(record.restarted_at)
    if record.reason is not None:
        entry["lastRestartReason"] = record.reason
    if group.gang.held_until is not None:
        entry["nextRestartTime"] = rfc3339(group.gang.held_until)
    return entry


def restarting_message(groups: list[GroupState]) -> str:
    """`; group 1 restarting (rank pod x-g1-0 exited with code 3 (Error))` for each group restarting, else ''."""
    parts = []
    for group in groups:
        if group.gang is None or not group.restarting:
            continue
        failure = group.gang.failure
        why = failure.message() if failure is not None else group.gang.record.reason
        held = "" if group.gang.held_until is None else f", restart backoff until {rfc3339(group.gang.held_until)}"
        parts.append(f"group {group.index} restarting ({why}{held})")
    return "".join(f"; {part}" for part in parts)


def groups_to_restart(groups: list[GroupState], max_unavailable: int) -> list[int]:
    """Outdated groups whose old pods to delete now: those already unavailable, then ready ones in index order while
    fewer than `max_unavailable` groups are unavailable."""
    unavailable = sum(1 for g in groups if not g.ready)
    restart = [g.index for g in groups if g.outdated and not g.ready]
    budget = max_unavailable - unavailable
    for group in groups:
        if group.outdated and group.ready and budget > 0:
            restart.append(group.index)
            budget -= 1
    return sorted(restart)


def group_index(obj: dict[str, Any]) -> int | None:
    value = obj.get("metadata", {}).get("labels", {}).get(Labels.GROUP)
    return int(value) if value is not None and value.isdigit() else None


def _placement_view(placement: dict[str, Any] | None) -> tuple[int | None, float | None, bool, str]:
    """(applied generation, balancedness, rebalancing, message) of the owned ExpertPlacement."""
    if placement is None:
        return None, None, False, "no ExpertPlacement yet"
    spec, status = placement.get("spec", {}), placement.get("status", {})
    applied = status.get("appliedGeneration")
    balance = status.get("measuredBalancedness", status.get("predictedBalancedness"))
    invalid = any(c.get("type") == "Invalid" and c.get("status") == "True" for c in status.get("conditions", []))
    generation = spec.get("generation")
    rebalancing = not invalid and generation is not None and applied != generation
    message = f"placement generation {generation}, applied {applied}" + (" (spec Invalid)" if invalid else "")
    return applied, balance, rebalancing, message


def summary(suspended: bool, available: Desired, progressing: Desired, degraded: Desired) -> Summary:
    """Where the serving stands for kstatus: Ready once every group is ready and updated and the frontend routes;
    a degraded serving is still being reconciled (the StatefulSets recreate its ranks). Rebalancing, which never
    stops serving, does not count."""
    if suspended:
        return Summary(State.READY, "Suspended", "spec.suspend is true")
    for condition in (degraded, progressing):
        if condition.status:
            return Summary(State.RECONCILING, condition.reason, condition.message)
    if not available.status:
        return Summary(State.RECONCILING, available.reason, available.message)
    return Summary(State.READY, available.reason, available.message)


def serving_status(
    serving: K2Serving,
    groups: list[GroupState],
    frontend_ready: int,
    placement: dict[str, Any] | None,
    now: dt.datetime,
) -> dict[str, Any]:
    spec = serving.spec
    previous = serving.status.to_dict() if serving.status else {}
    old_conditions = previous.get("conditions", [])
    generation = serving.metadata.generation
    ready_groups = sum(1 for g in groups if g.ready)
    updated_groups = sum(1 for g in groups if g.settled and not g.outdated)
    ready_ranks = sum(g.ready_ranks for g in groups)
    frontend_ok = spec.frontend.replicas == 0 or frontend_ready > 0
    applied, balance, rebalancing, placement_message = _placement_view(placement)
    counts = f"{ready_groups}/{spec.groups} groups ready, {updated_groups}/{spec.groups} updated"
    counts += restarting_message(groups)

    if spec.suspend:
        available = Desired(S.AVAILABLE, False, "Suspended", "spec.suspend is true")
        progressing = Desired(S.PROGRESSING, False, "Suspended", "")
        degraded = Desired(S.DEGRADED, False, "Suspended", "")
    else:
        complete = ready_groups == spec.groups and updated_groups == spec.groups and len(groups) == spec.groups
        available = Desired(
            S.AVAILABLE,
            ready_groups > 0 and frontend_ok,
            "GroupsReady"
            if ready_groups > 0 and frontend_ok
            else ("FrontendNotReady" if ready_groups else "NoGroupReady"),
            counts,
        )
        rolling = updated_groups < spec.groups
        progressing = Desired(
            S.PROGRESSING,
            not complete,
            "RolloutComplete" if complete else ("RollingUpdate" if rolling else "GroupsStarting"),
            counts,
        )
        # Degraded: a group that was ready under this generation is down, and no rollout explains it.
        old_progressing = find(old_conditions, S.PROGRESSING)
        was_complete = (
            old_progressing is not None
            and old_progressing.get("status") == "False"
            and old_progressing.get("reason") == "RolloutComplete"
            and old_progressing.get("observedGeneration") == generation
        )
        old_degraded = find(old_conditions, S.DEGRADED)
        still_degraded = old_degraded is not None and old_degraded.get("status") == "True"
        is_degraded = not rolling and ready_groups < spec.groups and (was_complete or still_degraded)
        degraded = Desired(S.DEGRADED, is_degraded, "GroupsNotReady" if is_degraded else "AsExpected", counts)
    rebalance = Desired(
        S.REBALANCING, rebalancing, "ApplyingPlacement" if rebalancing else "PlacementApplied", placement_message
    )
    conditions = [available, progressing, degraded, rebalance]
    state = summary(spec.suspend, available, progressing, degraded)
    return {
        "observedGeneration": generation,
        "groups": len(groups),
        "readyGroups": ready_groups,
        "updatedGroups": updated_groups,
        "readyRanks": ready_ranks,
        "selector": rank_selector(serving),
        "endpoint": endpoint(serving),
        "placementName": placement_name(serving),
        "placementGeneration": applied,
        "balancedness": balance,
        "groupStatuses": [group_status(g) for g in groups],
        "conditions": merge(old_conditions, [*conditions, *kstatus_conditions(state)], generation, now),
    }
