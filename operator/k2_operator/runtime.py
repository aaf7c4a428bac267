"""Shared machinery of the three reconciles: the API adapter, one-at-a-time coalescing per object, the periodic
resync, and writing status (only when it changed) followed by Events for condition transitions.

Triggers: kopf's create/update/resume handlers of each kind, watch events of the children (Jobs, StatefulSets,
Deployments, rank Pods, ExpertPlacements), and a resync every `resync_seconds` over all resources (the timer: it
also enforces activeDeadlineSeconds and ttlSecondsAfterFinished). The resync is a plain task rather than
`@kopf.timer`, because kopf timers put a finalizer on every resource, which would block deletion whenever the
operator is down. All triggers for one object funnel into `trigger`, which runs at most one reconcile per object
at a time and folds triggers that arrive meanwhile into one more run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from k2_api.kube import NotFound, ObjectRef
from k2_operator import metrics
from k2_operator.builders.network_policy import MONITORING_NAMESPACE
from k2_operator.conditions import changed, normalized, transitions
from k2_operator.kube import AsyncKube
from k2_operator.status.kstatus import KSTATUS_TYPES

log = logging.getLogger("k2_operator")

Reconcile = Callable[[AsyncKube, str, str], Awaitable[None]]
WARNING_WHEN_TRUE = {"Failed", "Restarting", "Degraded", "Invalid", "Stalled", "CheckpointFallback"}


@dataclass
class Runtime:
    kube: AsyncKube | None = None
    namespaces: list[str] = field(default_factory=list)
    """Empty: every namespace."""
    resync_seconds: float = 30.0
    monitoring_namespaces: list[str] = field(default_factory=lambda: [MONITORING_NAMESPACE])
    """Namespaces whose pods may reach the ranks' metrics port (--monitoring-namespace)."""
    reconcilers: dict[str, Reconcile] = field(default_factory=dict)
    running: set[tuple[str, str, str]] = field(default_factory=set)
    pending: set[tuple[str, str, str]] = field(default_factory=set)

    def client(self) -> AsyncKube:
        assert self.kube is not None, "the operator's startup handler connects first"
        return self.kube


RUNTIME = Runtime()


def register(kind: str) -> Callable[[Reconcile], Reconcile]:
    def decorate(fn: Reconcile) -> Reconcile:
        RUNTIME.reconcilers[kind] = fn
        return fn

    return decorate


async def trigger(kind: str, namespace: str | None, name: str | None) -> None:
    """Reconciles the object now, or once more after the reconcile already running for it."""
    if not namespace or not name:
        return
    key = (kind, namespace, name)
    if key in RUNTIME.running:
        RUNTIME.pending.add(key)
        return
    RUNTIME.running.add(key)
    try:
        while True:
            RUNTIME.pending.discard(key)
            with metrics.observe(kind):
                await RUNTIME.reconcilers[kind](RUNTIME.client(), namespace, name)
            if key not in RUNTIME.pending:
                break
    finally:
        RUNTIME.running.discard(key)


async def resync_forever() -> None:
    """The timer: reconcile every resource of every kind each `resync_seconds`."""
    while True:
        await asyncio.sleep(RUNTIME.resync_seconds)
        for kind in list(RUNTIME.reconcilers):
            scopes: list[str | None] = list(RUNTIME.namespaces) or [None]
            for namespace in scopes:
                try:
                    items = await RUNTIME.client().list(kind, namespace)
                except Exception as error:  # transient (API server restarting, CRD being updated): next tick
                    log.warning("resync: listing %s failed: %s", kind, error)
                    continue
                for item in items:
                    meta = item["metadata"]
                    try:
                        await trigger(kind, meta.get("namespace"), meta.get("name"))
                    except Exception as error:  # counted in k2_operator_reconcile_errors_total; next tick retries
                        log.warning("resync: %s %s/%s failed: %r", kind, meta.get("namespace"), meta.get("name"), error)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences", []))


def controller_owner(obj: dict[str, Any], kind: str) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences", []):
        if ref.get("kind") == kind and ref.get("controller"):
            name: str = ref["name"]
            return name
    return None


async def write_status(
    kube: AsyncKube, body: dict[str, Any], status: dict[str, Any], condition_types: tuple[str, ...]
) -> bool:
    """Applies `status` when it differs from the observed one, then posts one Event per transition of the kind's own
    conditions (not of kstatus' Ready, Reconciling and Stalled, which only summarize them)."""
    observed = body.get("status")
    if not changed(observed, status, condition_types):
        return False
    meta = body["metadata"]
    kind = body["kind"]
    try:
        await kube.apply_status(kind, meta["namespace"], meta["name"], normalized(status))
    except NotFound:  # deleted while this reconcile ran: nothing left to report on
        return False
    metrics.STATUS_WRITES.labels(kind).inc()
    ref = ObjectRef(body["apiVersion"], kind, meta["namespace"], meta["name"], meta.get("uid"))
    for condition in transitions((observed or {}).get("conditions", []), status.get("conditions", [])):
        if condition["type"] in KSTATUS_TYPES:  # a summary of the kind's own conditions, whose events say it already
            continue
        true = condition["status"] == "True"
        event_type = "Warning" if true and condition["type"] in WARNING_WHEN_TRUE else "Normal"
        reason = f"{condition['type']}{'' if true else 'Cleared'}"
        message = condition.get("message") or condition.get("reason") or ""
        try:
            await kube.event(ref, event_type, reason, message)
        except Exception:  # an Event is best effort; the status is already written
            log.warning("could not post event %s for %s %s/%s", reason, kind, meta["namespace"], meta["name"])
    return True
