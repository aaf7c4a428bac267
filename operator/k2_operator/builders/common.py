"""Pieces every child object shares: names, standard labels, owner references, the restricted security context.

Builders are pure: `(resource, observed) -> manifest dict`. Every child carries the four app.kubernetes.io labels and
a controller owner reference to its K2 resource, so `kubectl get all -l app.kubernetes.io/instance=<name>` finds it
and deleting the resource garbage-collects it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from k2_api import claims, uris
from k2_api.common import Resource, Scheduling
from k2_api.contract import Annotations, FieldManagers, Labels

MANAGED_BY = FieldManagers.OPERATOR
PART_OF = "k2"
NON_ROOT_UID = 1000

Manifest = dict[str, Any]


def labels(resource: Resource, component: str, **extra: str) -> dict[str, str]:
    """The standard labels of a child, plus `extra`."""
    name = resource.metadata.name
    assert name is not None
    base = {
        "app.kubernetes.io/name": PART_OF,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        Labels.KIND: type(resource).KIND,
    }
    return {**base, **extra}


def selector_labels(resource: Resource, component: str, **extra: str) -> dict[str, str]:
    """The immutable subset of `labels` used in selectors (StatefulSet/Deployment/Service)."""
    name = resource.metadata.name
    assert name is not None
    return {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": component, **extra}


def owner_reference(resource: Resource) -> dict[str, Any]:
    meta = resource.metadata
    assert meta.name is not None and meta.uid is not None, "children are built for stored resources only"
    return {
        "apiVersion": resource.api_version,
        "kind": type(resource).KIND,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(resource: Resource, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": resource.metadata.namespace,
        "labels": labels(resource, component, **extra_labels),
        "ownerReferences": [owner_reference(resource)],
    }


def propagated_annotations(resource: Resource) -> dict[str, str]:
    return {
        k: v for k, v in sorted(resource.metadata.annotations.items()) if k.startswith(Annotations.PROPAGATED_PREFIX)
    }


def pod_security_context() -> dict[str, Any]:
    """Pod Security Standard "restricted" at pod level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Pod Security Standard "restricted" at container level, with a read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scheduling_fields(scheduling: Scheduling) -> dict[str, Any]:
    """nodeSelector, tolerations, affinity, priorityClassName and schedulerName of a pod spec (only those set)."""
    wire = scheduling.to_dict()
    fields: dict[str, Any] = {}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName"):
        if wire.get(key):
            fields[key] = wire[key]
    return fields


def resources(cpu: int | str | None, memory: int | str | None, gpu_name: str, gpus: int) -> dict[str, Any]:
    """Requests equal limits for cpu/memory (Guaranteed QoS when both are set); GPUs as limits (extended resource)."""
    fixed = {k: str(v) for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    limits = dict(fixed)
    if gpus > 0:
        limits[gpu_name] = str(gpus)
    out: dict[str, Any] = {}
    if fixed:
        out["requests"] = fixed
    if limits:
        out["limits"] = limits
    return out


def content_hash(value: Any) -> str:
    """A short stable hash of a JSON-able value (rolls pods when what they read changes)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def writable_tmp() -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of an emptyDir at /tmp: the root filesystem is read-only."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def claims_of(uri_fields: Mapping[str, str | None]) -> list[str]:
    """The distinct claims that the storage URIs `{field: uri}` name (`pvc://<claim>/...`), sorted."""
    named = {uris.claim_of(uri, field) for field, uri in uri_fields.items()}
    return sorted(claim for claim in named if claim is not None)


def claim_volumes(
    claim_names: list[str], existing: Mapping[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) that mount every claim read-only at `Files.CLAIMS_ROOT/<claim>`.

    A claim the pod already has as a volume (`existing`: claim -> volume name, e.g. a training's checkpoint claim)
    gets only the read-only mount of that volume; every other claim a `claim-<i>` volume.
    """
    existing = existing or {}
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for index, claim in enumerate(claim_names):
        name = existing.get(claim)
        if name is None:
            name = f"claim-{index}"
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": claims.mount_path(claim), "readOnly": True})
    return volumes, mounts


def worker_rbac(resource: Resource, name: str, component: str, rules: list[dict[str, Any]]) -> list[Manifest]:
    """ServiceAccount, Role with exactly `rules`, and their RoleBinding, all named `name`."""
    namespace = resource.metadata.namespace
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(resource, name, component),
            "automountServiceAccountToken": True,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(resource, name, component),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(resource, name, component),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]
