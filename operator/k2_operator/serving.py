"""K2Serving handlers: one level-based reconcile, triggered on create, update, resume, child events and the resync."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from k2_api import GROUP, VERSION, ExpertPlacement, K2Serving
from k2_api.contract import FieldManagers, Labels
from k2_operator.builders.network_policy import KIND as NETWORK_POLICY
from k2_operator.builders.network_policy import network_policies
from k2_operator.builders.placement import expert_placement, placement_name
from k2_operator.builders.serving import RANK_COMPONENT, children, frontend_name
from k2_operator.kube import AsyncKube
from k2_operator.runtime import RUNTIME, controller_owner, now, owned_by, register, trigger, write_status
from k2_operator.status.serving import (
    CONDITION_TYPES,
    GroupState,
    group_index,
    group_state,
    groups_to_restart,
    serving_status,
)

KIND = K2Serving.KIND
REVISION_LABEL = "controller-revision-hash"
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


async def restart_groups(
    kube: AsyncKube, serving: K2Serving, groups: list[int], stateful_sets: dict[int, dict[str, Any]]
) -> None:
    """Deletes the outdated pods of `groups`; their StatefulSets recreate them from the new template (OnDelete)."""
    namespace, name = serving.metadata.namespace, serving.metadata.name
    assert namespace is not None and name is not None
    for group in groups:
        revision = stateful_sets[group].get("status", {}).get("updateRevision")
        selector = {
            "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": RANK_COMPONENT,
            Labels.GROUP: str(group),
        }
        for pod in await kube.list("Pod", namespace, selector):
            labels = pod["metadata"].get("labels", {})
            if revision and labels.get(REVISION_LABEL) != revision and not pod["metadata"].get("deletionTimestamp"):
                log.info("%s/%s: restarting group %d (pod %s)", namespace, name, group, pod["metadata"]["name"])
                await kube.delete("Pod", namespace, pod["metadata"]["name"])


async def delete_owned(kube: AsyncKube, serving: K2Serving, kind: str) -> None:
    """Deletes the serving's children of `kind` (its labels and its controller owner reference)."""
    namespace, name = serving.metadata.namespace, serving.metadata.name
    assert namespace is not None and name is not None
    for obj in await kube.list(kind, namespace, {"app.kubernetes.io/instance": name, Labels.KIND: KIND}):
        if owned_by(obj, serving.metadata.uid):
            await kube.delete(kind, namespace, obj["metadata"]["name"])


@register(KIND)
async def reconcile(kube: AsyncKube, namespace: str, name: str) -> None:
    body = await kube.get(KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    serving = K2Serving.model_validate(body)
    spec = serving.spec
    placement = await ensure_placement(kube, serving)
    stateful_sets: dict[int, dict[str, Any]] = {}
    frontend: dict[str, Any] | None = None
    for manifest in children(serving):
        applied = await kube.apply(manifest)
        index = group_index(applied)
        if manifest["kind"] == "StatefulSet" and index is not None:
            stateful_sets[index] = applied
        elif manifest["kind"] == "Deployment" and manifest["metadata"]["name"] == frontend_name(serving):
            frontend = applied
    policies = network_policies(serving, RUNTIME.monitoring_namespaces)
    for manifest in policies:
        await kube.apply(manifest)
    if not policies:  # spec.networkPolicy.enabled is false: the ones it created before go
        await delete_owned(kube, serving, NETWORK_POLICY)
    # Scale down: groups beyond spec.groups go (their pods are garbage-collected).
    selector = {"app.kubernetes.io/instance": name, Labels.KIND: KIND, "app.kubernetes.io/component": RANK_COMPONENT}
    for kind in ("StatefulSet", "Service", NETWORK_POLICY):
        for obj in await kube.list(kind, namespace, selector):
            index = group_index(obj)
            if index is not None and index >= spec.groups and owned_by(obj, serving.metadata.uid):
                await kube.delete(kind, namespace, obj["metadata"]["name"])
    groups: list[GroupState] = [group_state(g, stateful_sets.get(g), spec.ranks_per_group) for g in range(spec.groups)]
    if not spec.suspend:
        await restart_groups(
            kube, serving, groups_to_restart(groups, spec.rollout.max_unavailable_groups), stateful_sets
        )
    frontend_ready = int((frontend or {}).get("status", {}).get("readyReplicas", 0) or 0)
    status = serving_status(serving, groups, frontend_ready, placement, now())
    await write_status(kube, body, status, CONDITION_TYPES)


@kopf.on.resume(GROUP, VERSION, K2Serving.PLURAL)
@kopf.on.create(GROUP, VERSION, K2Serving.PLURAL)
@kopf.on.update(GROUP, VERSION, K2Serving.PLURAL)
async def on_serving(namespace: str | None, name: str, **_: Any) -> None:
    await trigger(KIND, namespace, name)


@kopf.on.event("apps", "v1", "statefulsets", labels={Labels.KIND: KIND})
@kopf.on.event("apps", "v1", "deployments", labels={Labels.KIND: KIND})
async def on_child(body: kopf.Body, **_: Any) -> None:
    await trigger(KIND, body.metadata.namespace, body.metadata.labels.get("app.kubernetes.io/instance"))


@kopf.on.event(GROUP, VERSION, ExpertPlacement.PLURAL)
async def on_placement_status(body: kopf.Body, **_: Any) -> None:
    """A placement's status (applied generation, balancedness) shows in its serving's status."""
    await trigger(KIND, body.metadata.namespace, controller_owner(dict(body), KIND))
