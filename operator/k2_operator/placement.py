"""ExpertPlacement handlers: validate the spec, carry the valid generation to the ranks, count their reports."""

from __future__ import annotations

from typing import Any

import kopf

from k2_api import GROUP, VERSION, ExpertPlacement, K2Serving
from k2_api.contract import Labels
from k2_operator.builders.placement import active_config_map, active_config_name, active_generation
from k2_operator.builders.serving import RANK_COMPONENT
from k2_operator.kube import AsyncKube
from k2_operator.runtime import controller_owner, now, register, trigger, write_status
from k2_operator.status.placement import CONDITION_TYPES, plan

KIND = ExpertPlacement.KIND


async def rank_pods(kube: AsyncKube, namespace: str, serving_name: str | None) -> tuple[list[dict[str, Any]], int]:
    """(rank pods of the current groups, ranks that must apply the placement) of the owning K2Serving."""
    if serving_name is None:
        return [], 0
    serving = await kube.get(K2Serving.KIND, namespace, serving_name)
    if serving is None:
        return [], 0
    spec = K2Serving.model_validate(serving).spec
    if spec.suspend:
        return [], 0
    selector = {"app.kubernetes.io/instance": serving_name, "app.kubernetes.io/component": RANK_COMPONENT}
    pods = [
        p
        for p in await kube.list("Pod", namespace, selector)
        if int(p["metadata"].get("labels", {}).get(Labels.GROUP, "-1")) in range(spec.groups)
        and not p["metadata"].get("deletionTimestamp")
    ]
    return pods, spec.groups * spec.ranks_per_group


@register(KIND)
async def reconcile(kube: AsyncKube, namespace: str, name: str) -> None:
    body = await kube.get(KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    pods, total = await rank_pods(kube, namespace, controller_owner(body, K2Serving.KIND))
    active = await kube.get("ConfigMap", namespace, active_config_name(name))
    decision = plan(body, active_generation(active), pods, total, now())
    if decision.valid and active_generation(active) != decision.in_force:
        await kube.apply(active_config_map(ExpertPlacement.model_validate(body)))
    await write_status(kube, body, decision.status, CONDITION_TYPES)


@kopf.on.resume(GROUP, VERSION, ExpertPlacement.PLURAL)
@kopf.on.create(GROUP, VERSION, ExpertPlacement.PLURAL)
@kopf.on.update(GROUP, VERSION, ExpertPlacement.PLURAL)
async def on_placement(namespace: str | None, name: str, **_: Any) -> None:
    await trigger(KIND, namespace, name)


@kopf.on.event("", "v1", "pods", labels={Labels.KIND: K2Serving.KIND, "app.kubernetes.io/component": RANK_COMPONENT})
async def on_rank_pod(body: kopf.Body, **_: Any) -> None:
    """A rank's report (its applied-generation annotation) or its readiness changed."""
    await trigger(KIND, body.metadata.namespace, body.metadata.labels.get("app.kubernetes.io/instance"))
