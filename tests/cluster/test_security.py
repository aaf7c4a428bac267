"""The apiserver enforces policy: PodSecurity admission and RBAC authorization are on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.cluster import Cluster
from tests.support.kube import apply

pytestmark = pytest.mark.integration


def _privileged_pod() -> dict[str, Any]:
    main = {"name": "main", "image": "registry.invalid/k2/worker:test", "securityContext": {"privileged": True}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"}, "spec": {"containers": [main]}}


def test_restricted_namespace_rejects_a_privileged_pod(cluster: Cluster, namespace: str) -> None:
    pod = json.dumps(_privileged_pod())
    # Unlabelled, the apiserver accepts it (--allow-privileged=true): the rejection below is PodSecurity admission's.
    cluster.kubectl("create", "--dry-run=server", "-f", "-", "-n", namespace, input=pod)
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")

    rejected = cluster.kubectl("create", "-f", "-", "-n", namespace, input=pod, check=False)

    assert rejected.returncode != 0
    assert "violates PodSecurity" in rejected.stderr
    assert "privileged" in rejected.stderr


def test_service_account_without_a_role_is_forbidden(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    user = f"system:serviceaccount:{namespace}:nobody"

    denied = cluster.kubectl("get", "pods", "-n", namespace, f"--as={user}", check=False)
    can_i = cluster.kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={user}", check=False)

    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert can_i.stdout.strip() == "no"

    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "nobody-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
    }
    apply(cluster, role, namespace=namespace)
    apply(cluster, binding, namespace=namespace)
    # The same identity is allowed once a Role grants it: the denial above came from RBAC, not from impersonation.
    assert cluster.kubectl("get", "pods", "-n", namespace, f"--as={user}").returncode == 0
    can_delete = cluster.kubectl("auth", "can-i", "delete", "pods", "-n", namespace, f"--as={user}", check=False)
    assert can_delete.stdout.strip() == "no"
