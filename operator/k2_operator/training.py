"""K2Training handlers: one level-based reconcile, triggered on create, update, resume, Job events and the resync."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from k2_api import GROUP, VERSION, K2Training
from k2_api.contract import Annotations, Labels
from k2_api.training import BROKEN_GANG_GRACE_S
from k2_operator.builders.common import content_hash
from k2_operator.builders.training import children
from k2_operator.children import APPLIED, apply_children, kinds_to_observe, observe
from k2_operator.kube import AsyncKube
from k2_operator.runtime import now, register, trigger, write_status
from k2_operator.status.training import CONDITION_TYPES, plan

KIND = K2Training.KIND
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
log = logging.getLogger("k2_operator.training")


def _with_template_hash(job: dict[str, Any]) -> dict[str, Any]:
    """The Job labelled with a hash of its immutable parts: a changed template means delete and recreate."""
    immutable = {k: v for k, v in job["spec"].items() if k not in ("suspend", "parallelism")}
    job["metadata"]["labels"][Annotations.TEMPLATE_HASH] = content_hash(immutable)
    return job


def broken_gang_pods(pods: list[dict[str, Any]], broken_jobs: list[str]) -> list[str]:
    """The pods of a crashed attempt's Jobs that have not finished, by name (pure): deleted with a short grace, so that
    a hung rank does not hold the restart for the whole preemption grace."""
    return sorted(
        pod["metadata"]["name"]
        for pod in pods
        if pod["metadata"].get("labels", {}).get(JOB_NAME_LABEL) in broken_jobs
        and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    )


CHILD_KINDS = ("ConfigMap", "Service", "ServiceAccount", "Role", "RoleBinding", "Job")
"""Every kind of child the reconcile applies (listed once per reconcile: its observed children)."""


@register(KIND)
async def reconcile(kube: AsyncKube, namespace: str, name: str) -> None:
    owner = (KIND, namespace, name)
    body = await kube.get(KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        APPLIED.forget(owner)
        return
    training = K2Training.model_validate(body)
    selector = {"app.kubernetes.io/instance": name, Labels.KIND: KIND}
    observed, pods = await asyncio.gather(
        observe(kube, namespace, selector, kinds_to_observe(owner, CHILD_KINDS, ["Job"]), training.metadata.uid),
        kube.list("Pod", namespace, selector),  # their termination messages explain a failed Job
    )
    jobs = [obj for (kind, _, _), obj in sorted(observed.items()) if kind == "Job"]
    decision = plan(training, jobs, now(), pods)
    if decision.delete_training:
        log.info("%s/%s: ttlSecondsAfterFinished passed, deleting", namespace, name)
        await kube.delete(KIND, namespace, name)
        APPLIED.forget(owner)
        return
    for pod in broken_gang_pods(pods, decision.broken_jobs):
        await kube.delete("Pod", namespace, pod, grace_period_s=BROKEN_GANG_GRACE_S)
    for job_name in decision.delete_jobs:
        await kube.delete("Job", namespace, job_name)
    if decision.run_gang:
        existing = {j["metadata"]["name"]: j for j in jobs if j["metadata"]["name"] not in decision.delete_jobs}
        manifests = []
        for manifest in children(training, decision.attempt, decision.preemptions):
            if manifest["kind"] == "Job":
                manifest = _with_template_hash(manifest)
                old = existing.get(manifest["metadata"]["name"])
                old_hash = (old or {}).get("metadata", {}).get("labels", {}).get(Annotations.TEMPLATE_HASH)
                if old is not None and old_hash != manifest["metadata"]["labels"][Annotations.TEMPLATE_HASH]:
                    # Job templates are immutable: the gang restarts with the new spec (from the checkpoint).
                    await kube.delete("Job", namespace, manifest["metadata"]["name"])
                    continue
            manifests.append(manifest)
        await apply_children(kube, owner, manifests, observed)
    await write_status(kube, body, decision.status, CONDITION_TYPES)


@kopf.on.resume(GROUP, VERSION, K2Training.PLURAL)
@kopf.on.create(GROUP, VERSION, K2Training.PLURAL)
@kopf.on.update(GROUP, VERSION, K2Training.PLURAL)
async def on_training(namespace: str | None, name: str, **_: Any) -> None:
    await trigger(KIND, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={Labels.KIND: KIND})
async def on_job(body: kopf.Body, **_: Any) -> None:
    await trigger(KIND, body.metadata.namespace, body.metadata.labels.get("app.kubernetes.io/instance"))
