"""The kinds the adapter knows: API group/version, plural, and whether status is a separate subresource."""

from __future__ import annotations

from dataclasses import dataclass

from k2_api.common import API_VERSION
from k2_api.placement import ExpertPlacement
from k2_api.serving import K2Serving
from k2_api.training import K2Training


@dataclass(frozen=True)
class Resource:
    api_version: str
    """`v1` for the core group, else `group/version`."""
    plural: str
    namespaced: bool = True
    status_subresource: bool = False
    """Status is written only through `/status`; writes of the object itself leave it alone (and vice versa)."""

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The REST path; `namespace` None lists across all namespaces."""
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


RESOURCES: dict[str, Resource] = {
    "ConfigMap": Resource("v1", "configmaps"),
    "Service": Resource("v1", "services", status_subresource=True),
    "ServiceAccount": Resource("v1", "serviceaccounts"),
    "Pod": Resource("v1", "pods", status_subresource=True),
    "Event": Resource("v1", "events"),
    "Namespace": Resource("v1", "namespaces", namespaced=False, status_subresource=True),
    "Role": Resource("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Resource("rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": Resource("batch/v1", "jobs", status_subresource=True),
    "StatefulSet": Resource("apps/v1", "statefulsets", status_subresource=True),
    "Deployment": Resource("apps/v1", "deployments", status_subresource=True),
    "NetworkPolicy": Resource("networking.k8s.io/v1", "networkpolicies"),
    K2Training.KIND: Resource(API_VERSION, K2Training.PLURAL, status_subresource=True),
    K2Serving.KIND: Resource(API_VERSION, K2Serving.PLURAL, status_subresource=True),
    ExpertPlacement.KIND: Resource(API_VERSION, ExpertPlacement.PLURAL, status_subresource=True),
}


def resource(kind: str) -> Resource:
    try:
        return RESOURCES[kind]
    except KeyError:
        raise ValueError(f"kind: {kind!r} is not one the adapter knows ({', '.join(sorted(RESOURCES))})") from None
