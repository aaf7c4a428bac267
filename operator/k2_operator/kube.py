"""The operator's only door to the Kubernetes API: server-side apply, get, list, delete, status apply, events.

Thin on purpose: the official synchronous client's `ApiClient.call_api` does authentication and TLS; each call runs
in a worker thread (`asyncio.to_thread`) so kopf's event loop never blocks. Every write uses one field manager,
`k2-operator`, with server-side apply and force, so the operator owns exactly the fields it sets: the workers'
`status.progress`, the EPLB controller's placement fields and the users' own labels are left alone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "k2-operator"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"

# kind -> (api path prefix, plural): the kinds the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Pod": ("/api/v1", "pods"),
    "Event": ("/api/v1", "events"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "K2Training": ("/apis/k2.ai/v1alpha1", "k2trainings"),
    "K2Serving": ("/apis/k2.ai/v1alpha1", "k2servings"),
    "ExpertPlacement": ("/apis/k2.ai/v1alpha1", "expertplacements"),
}


def path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    parts = [prefix]
    if namespace is not None:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name is not None:
        parts.append(name)
    if subresource is not None:
        parts.append(subresource)
    return "/".join(parts)


@dataclass(frozen=True)
class ObjectRef:
    """What an Event points at."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str | None = None


class Kube:
    """Async facade over `kubernetes.client.ApiClient`."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    @classmethod
    def connect(cls, kubeconfig: Path | None = None) -> Kube:
        """From `kubeconfig`, else $KUBECONFIG or ~/.kube/config, else the in-cluster ServiceAccount."""
        configuration = client.Configuration()
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig) if kubeconfig else None, client_configuration=configuration
            )
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(configuration))

    async def _call(
        self,
        method: str,
        url: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type

        def call() -> Any:
            request = self.api_client.param_serialize(
                method, url, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            response = self.api_client.call_api(*request)
            data = response.read()  # type: ignore[no-untyped-call]
            if not 200 <= response.status < 300:
                raise ApiException(status=response.status, reason=response.reason, body=data.decode(errors="replace"))
            return json.loads(data) if data else None

        return await asyncio.to_thread(call)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of a whole object (creates it when absent)."""
        meta = manifest["metadata"]
        url = path(manifest["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        result: dict[str, Any] = await self._call("PATCH", url, manifest, query, APPLY_PATCH)
        return result

    async def apply_status(
        self, api_version: str, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Server-side apply of the status subresource: the operator's status fields, nothing else."""
        body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}}
        body["status"] = status
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        await self._call("PATCH", path(kind, namespace, name, "status"), body, query, APPLY_PATCH)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """POST; None when the object already exists (a create-once child)."""
        meta = manifest["metadata"]
        try:
            result: dict[str, Any] = await self._call(
                "POST", path(manifest["kind"], meta.get("namespace")), manifest, [("fieldManager", FIELD_MANAGER)]
            )
        except ApiException as error:
            if error.status == 409:
                return None
            raise
        return result

    async def replace_spec(self, kind: str, namespace: str, name: str, spec: dict[str, Any], version: str) -> None:
        """Merge-patch spec guarded by resourceVersion (a concurrent writer makes it fail with 409)."""
        body = {"metadata": {"resourceVersion": version}, "spec": spec}
        await self._call("PATCH", path(kind, namespace, name), body, [("fieldManager", FIELD_MANAGER)], MERGE_PATCH)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", path(kind, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return result

    async def list(
        self, kind: str, namespace: str | None, selector: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query = []
        if selector:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(selector.items()))))
        answer = await self._call("GET", path(kind, namespace), query=query)
        items: list[dict[str, Any]] = answer.get("items", [])
        return items

    async def delete(self, kind: str, namespace: str | None, name: str, propagation: str = "Background") -> bool:
        """True when something was deleted; a missing object is fine."""
        body = {"propagationPolicy": propagation}
        try:
            await self._call("DELETE", path(kind, namespace, name), body)
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:12]}", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call("POST", path("Event", ref.namespace), body)
