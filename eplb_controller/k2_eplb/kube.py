"""The controller's typed reads and writes, over the shared adapter (`k2_api.kube.Kube`, field manager `k2-eplb`).

Writes: the controller owns all of ExpertPlacement.spec after the operator created it. `write_placement` applies the
whole spec (shape, layers, generation, reason) with server-side apply and force, carrying the observed
resourceVersion as a precondition, so a concurrent change makes it fail with Conflict instead of being overwritten,
and `k2-eplb` ends up the one manager of every spec field. The planner's findings go into status with server-side
apply, so the operator's and the workers' status fields and conditions (a list map keyed by type) stay theirs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from k2_api import API_VERSION, ExpertPlacement, K2Serving
from k2_api.contract import Annotations, FieldManagers, Labels, PortNames
from k2_api.kube import Kube, Object, ObjectRef
from k2_eplb.topology import RankNode, rank_index

FIELD_MANAGER = FieldManagers.EPLB


def connect(kubeconfig: Path | None = None) -> Kube:
    """The adapter as the controller uses it: from `kubeconfig`, else $KUBECONFIG, else in-cluster."""
    from k2_api.kube.client import connect as connect_client

    return connect_client(kubeconfig, field_manager=FIELD_MANAGER)


def list_servings(kube: Kube, namespace: str | None) -> list[K2Serving]:
    return [K2Serving.model_validate(item) for item in kube.list(K2Serving.KIND, namespace)]


def list_serving_objects(kube: Kube, namespace: str | None) -> list[Object]:
    """The K2Servings unparsed, so that one that does not validate fails only its own pass."""
    return kube.list(K2Serving.KIND, namespace)


def key_of(obj: Object) -> tuple[str, str]:
    """(namespace, name) of an object as the API server sent it."""
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def get_placement(kube: Kube, namespace: str, name: str) -> ExpertPlacement | None:
    body = kube.get(ExpertPlacement.KIND, namespace, name)
    return None if body is None else ExpertPlacement.model_validate(body)


def write_placement(kube: Kube, placement: ExpertPlacement, spec: dict[str, Any], at: float) -> None:
    """Applies `spec` (the whole of it) and the rebalanced-at annotation, if `placement` is still current."""
    meta = placement.metadata
    assert meta.name and meta.namespace and meta.resource_version
    kube.apply(
        {
            "apiVersion": API_VERSION,
            "kind": ExpertPlacement.KIND,
            "metadata": {
                "name": meta.name,
                "namespace": meta.namespace,
                "resourceVersion": meta.resource_version,
                "annotations": {Annotations.REBALANCED_AT: rfc3339(at)},
            },
            "spec": spec,
        }
    )


def apply_status(kube: Kube, placement: ExpertPlacement, status: dict[str, Any]) -> None:
    meta = placement.metadata
    assert meta.name and meta.namespace
    kube.apply_status(ExpertPlacement.KIND, meta.namespace, meta.name, status)


def post_event(kube: Kube, placement: ExpertPlacement, event_type: str, reason: str, message: str) -> None:
    meta = placement.metadata
    assert meta.name and meta.namespace
    ref = ObjectRef(API_VERSION, ExpertPlacement.KIND, meta.namespace, meta.name, meta.uid, meta.resource_version)
    kube.event(ref, event_type, reason, message)


def rank_endpoints(kube: Kube, serving: K2Serving) -> list[str]:
    """http://podIP:port/metrics of the serving's running rank pods (selector from status, the `metrics` port)."""
    meta = serving.metadata
    selector = serving.status.selector if serving.status else None
    if not meta.namespace or not selector:
        return []
    endpoints = []
    for pod in kube.list("Pod", meta.namespace, selector):
        status, spec = pod.get("status") or {}, pod.get("spec") or {}
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        ports = [
            port["containerPort"]
            for container in spec.get("containers", [])
            for port in container.get("ports") or []
            if port.get("name") == PortNames.METRICS
        ]
        if ports:
            endpoints.append(f"http://{status['podIP']}:{ports[0]}/metrics")
    return endpoints


def rank_nodes(kube: Kube, serving: K2Serving) -> list[RankNode]:
    """(group, rank, node) of the serving's scheduled rank pods that have not ended (selector from status)."""
    meta = serving.metadata
    selector = serving.status.selector if serving.status else None
    if not meta.namespace or not selector:
        return []
    placed = []
    for pod in kube.list("Pod", meta.namespace, selector):
        pod_meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        labels = pod_meta.get("labels") or {}
        rank = rank_index(str(pod_meta.get("name") or ""), labels)
        node = spec.get("nodeName")
        if rank is None or not node or status.get("phase") in ("Succeeded", "Failed"):
            continue
        placed.append(RankNode(str(labels.get(Labels.GROUP, "")), rank, str(node)))
    return placed


def rfc3339(at: float) -> str:
    return dt.datetime.fromtimestamp(at, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
