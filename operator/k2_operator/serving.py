"""K2Serving handlers: one level-based reconcile, triggered on create, update, resume, child events (rank pods
included) and the resync, plus a timer while a gang restart waits out its backoff.

Each reconcile lists the serving's children (one list per kind, concurrently) and rank pods, decides per group (a
gang restart after a rank failed, `k2_operator.gang`; a rolling update of outdated groups), applies the children
that may differ from their manifests (`k2_operator.children`) with each group's gang record on its StatefulSet,
deletes the children and pods no longer wanted, writes status, then posts the Events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import kopf

from k2_api import GROUP, VERSION, ExpertPlacement, K2Serving
from k2_api.contract import Annotations, FieldManagers, Labels
from k2_api.kube import ObjectRef
from k2_operator import gang, requeue
from k2_operator.builders.network_policy import KIND as NETWORK_POLICY
from k2_operator.builders.network_policy import network_policies
from k2_operator.builders.placement import expert_placement, placement_name
from k2_operator.builders.serving import RANK_COMPONENT, children, frontend_name
from k2_operator.children import APPLIED, ChildKey, apply_children, kinds_to_observe, observe
from k2_operator.kube import AsyncKube
from k2_operator.runtime import RUNTIME, controller_owner, now, owned_by, register, trigger, write_status
from k2_operator.status.serving import CONDITION_TYPES, group_index, group_state, groups_to_restart, serving_status

KIND = K2Serving.KIND
REVISION_LABEL = "controller-revision-hash"
GROUP_RESTART = "GroupRestart"
"""Reason of the Warning Event posted when a group's rank pods are restarted together."""
log = logging.getLogger("k2_operator.serving")


async def ensure_placement(kube: AsyncKube, serving: K2Serving) -> dict[str, Any] | None:
    """Creates the ExpertPlacement once, with its initial spec (the EPLB solver's answer on uniform load), and never
    writes it again. Its spec belongs to the EPLB controller, re-shaping included: a placement that no longer fits
    the serving (layers, experts, ranks, slots) gets a fresh solve from the controller, even with balancing disabled.
    The operator creates it on the controller's behalf, under the controller's field manager, so that `k2-eplb` is
    the one manager of spec from the first write on (docs/eplb.md, "One writer of spec")."""
    namespace, name = serving.metadata.namespace, placement_name(serving)
    assert namespace is not None
    current = await kube.get(ExpertPlacement.KIND, namespace, name)
    if current is None:
        created = await kube.create(expert_placement(serving), field_manager=FieldManagers.EPLB)
        return created or await kube.get(ExpertPlacement.KIND, namespace, name)
    if not owned_by(current, serving.metadata.uid):
        log.warning(
            "%s/%s: ExpertPlacement %s exists but is not owned by this K2Serving",
            namespace,
            serving.metadata.name,
            name,
        )
    return current


def rank_selector(name: str) -> dict[str, str]:
    """The serving's rank pods (their StatefulSets and Services also carry `Labels.KIND`)."""
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": RANK_COMPONENT}


def by_group(objects: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    grouped: dict[int, list[dict[str, Any]]] = {}
    for obj in objects:
        index = group_index(obj)
        if index is not None:
            grouped.setdefault(index, []).append(obj)
    return grouped


def gang_record(stateful_set: dict[str, Any] | None) -> gang.GangRecord:
    annotations = (stateful_set or {}).get("metadata", {}).get("annotations", {}) or {}
    return gang.GangRecord.from_annotation(annotations.get(Annotations.GANG))


def outdated_pods(stateful_set: dict[str, Any], pods: list[dict[str, Any]]) -> list[str]:
    """Rank pods not at the StatefulSet's updateRevision (a rolling update deletes them; OnDelete recreates them
    from the new template)."""
    revision = stateful_set.get("status", {}).get("updateRevision")
    if not revision:
        return []
    return [
        p["metadata"]["name"]
        for p in pods
        if p["metadata"].get("labels", {}).get(REVISION_LABEL) != revision
        and not p["metadata"].get("deletionTimestamp")
    ]


def plan_groups(
    serving: K2Serving,
    stateful_sets: dict[int, dict[str, Any]],
    pods: dict[int, list[dict[str, Any]]],
    at: dt.datetime,
) -> dict[int, gang.GangPlan]:
    """Per group of the spec: its gang plan, with the rolling update folded in for the groups it restarts now."""
    spec = serving.spec
    ranks = 0 if spec.suspend else spec.ranks_per_group
    rank_pods = {g: [gang.RankPod.from_pod(p) for p in pods.get(g, [])] for g in range(spec.groups)}
    plans = {g: gang.plan(gang_record(stateful_sets.get(g)), rank_pods[g], ranks, at) for g in range(spec.groups)}
    if spec.suspend:
        return plans
    states = [group_state(g, stateful_sets.get(g), spec.ranks_per_group, plans[g]) for g in range(spec.groups)]
    for g in groups_to_restart(states, spec.rollout.max_unavailable_groups):
        outdated = outdated_pods(stateful_sets[g], pods.get(g, []))
        if outdated:
            plans[g] = gang.roll(plans[g], rank_pods[g], outdated)
    return plans


def with_record(manifest: dict[str, Any], record: gang.GangRecord) -> dict[str, Any]:
    """The group's StatefulSet carrying its gang record (applied with it, so the one field manager keeps owning it)."""
    if record.is_empty():
        return manifest
    meta = manifest["metadata"]
    return {
        **manifest,
        "metadata": {**meta, "annotations": {**meta.get("annotations", {}), Annotations.GANG: record.to_annotation()}},
    }


def restart_message(group: int, plan: gang.GangPlan) -> str:
    assert plan.failure is not None
    record = plan.record
    return (
        f"group {group}: {plan.failure.message()}; restarting its rank pods together "
        f"(gang restart {record.restarts}, {record.streak} in a row; deleting {', '.join(plan.delete) or 'none'})"
    )


CHILD_KINDS = (
    "ConfigMap",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "Service",
    "StatefulSet",
    "Deployment",
    NETWORK_POLICY,
)
"""Every kind of child the reconcile applies (listed once per reconcile: its observed children)."""


GROUP_KINDS = ("StatefulSet", "Service", NETWORK_POLICY)
"""The kinds of child made per group (the gang plans read the StatefulSets, `surplus` all three)."""


def surplus(serving: K2Serving, observed: dict[ChildKey, dict[str, Any]]) -> list[ChildKey]:
    """Observed children no longer wanted: a group's children beyond spec.groups (its pods are garbage-collected),
    and every NetworkPolicy once spec.networkPolicy.enabled is false."""

    def unwanted(kind: str, obj: dict[str, Any]) -> bool:
        if kind == NETWORK_POLICY and not serving.spec.network_policy.enabled:
            return True
        index = group_index(obj)
        return kind in GROUP_KINDS and index is not None and index >= serving.spec.groups

    return [key for key, obj in sorted(observed.items()) if unwanted(key[0], obj)]


def child_selector(name: str) -> dict[str, str]:
    """Every child of the serving (rank and frontend components)."""
    return {"app.kubernetes.io/instance": name, Labels.KIND: KIND}


@register(KIND)
async def reconcile(kube: AsyncKube, namespace: str, name: str) -> None:
    owner = (KIND, namespace, name)
    body = await kube.get(KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        APPLIED.forget(owner)
        return
    serving = K2Serving.model_validate(body)
    spec = serving.spec
    at = now()
    observed, rank_pods, placement = await asyncio.gather(
        observe(
            kube,
            namespace,
            child_selector(name),
            kinds_to_observe(owner, CHILD_KINDS, GROUP_KINDS),
            serving.metadata.uid,
        ),
        kube.list("Pod", namespace, rank_selector(name)),
        ensure_placement(kube, serving),
    )
    observed_sets = {
        index: obj
        for (kind, _, _), obj in observed.items()
        if kind == "StatefulSet" and (index := group_index(obj)) is not None
    }
    plans = plan_groups(serving, observed_sets, by_group(rank_pods), at)
    manifests = [
        with_record(m, plans[index].record) if m["kind"] == "StatefulSet" and (index := group_index(m)) in plans else m
        for m in children(serving)
    ]
    manifests += network_policies(serving, RUNTIME.monitoring_namespaces)
    current = await apply_children(kube, owner, manifests, observed)
    for kind, _, child in surplus(serving, observed):
        await kube.delete(kind, namespace, child)
    # The records are written: a restart interrupted from here on resumes on the next reconcile.
    for group, plan in plans.items():
        for pod in plan.delete:
            log.info("%s/%s: group %d: deleting rank pod %s", namespace, name, group, pod)
            await kube.delete("Pod", namespace, pod)
    stateful_sets = {
        index: obj
        for (kind, _, _), obj in current.items()
        if kind == "StatefulSet" and (index := group_index(obj)) is not None
    }
    frontend = current.get(("Deployment", namespace, frontend_name(serving)))
    groups = [group_state(g, stateful_sets.get(g), spec.ranks_per_group, plans.get(g)) for g in range(spec.groups)]
    frontend_ready = int((frontend or {}).get("status", {}).get("readyReplicas", 0) or 0)
    status = serving_status(serving, groups, frontend_ready, placement, at)
    await write_status(kube, body, status, CONDITION_TYPES)
    ref = ObjectRef(body["apiVersion"], KIND, namespace, name, serving.metadata.uid)
    for group, plan in plans.items():
        if plan.restarting_now:
            message = restart_message(group, plan)
            log.warning("%s/%s: %s", namespace, name, message)
            try:
                await kube.event(ref, "Warning", GROUP_RESTART, message)
            except Exception:  # an Event is best effort; the record and status tell the same
                log.warning("%s/%s: could not post the %s event", namespace, name, GROUP_RESTART)
    held = [p.held_until for p in plans.values() if p.held_until is not None]
    if held:
        requeue.REQUEUES.at(KIND, namespace, name, min(held))


@kopf.on.resume(GROUP, VERSION, K2Serving.PLURAL)
@kopf.on.create(GROUP, VERSION, K2Serving.PLURAL)
@kopf.on.update(GROUP, VERSION, K2Serving.PLURAL)
async def on_serving(namespace: str | None, name: str, **_: Any) -> None:
    await trigger(KIND, namespace, name)


@kopf.on.event("apps", "v1", "statefulsets", labels={Labels.KIND: KIND})
@kopf.on.event("apps", "v1", "deployments", labels={Labels.KIND: KIND})
async def on_child(body: kopf.Body, **_: Any) -> None:
    await trigger(KIND, body.metadata.namespace, body.metadata.labels.get("app.kubernetes.io/instance"))


@kopf.on.event("", "v1", "pods", labels={Labels.KIND: KIND, "app.kubernetes.io/component": RANK_COMPONENT})
async def on_group_pod(body: kopf.Body, **_: Any) -> None:
    """A rank pod changed (a container ended, the pod was deleted or recreated): its group may need a gang restart."""
    await trigger(KIND, body.metadata.namespace, body.metadata.labels.get("app.kubernetes.io/instance"))


@kopf.on.event(GROUP, VERSION, ExpertPlacement.PLURAL)
async def on_placement_status(body: kopf.Body, **_: Any) -> None:
    """A placement's status (applied generation, balancedness) shows in its serving's status."""
    await trigger(KIND, body.metadata.namespace, controller_owner(dict(body), KIND))
