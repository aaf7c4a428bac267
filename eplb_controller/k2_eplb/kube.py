"""The controller's only door to the Kubernetes API: list K2Servings, read and write ExpertPlacements, post Events.

Writes: the new placement goes into ExpertPlacement.spec with a JSON merge patch carrying the observed
resourceVersion (a concurrent change makes it fail with 409 instead of overwriting); the planner's findings go into
status with server-side apply under the field manager `k2-eplb`, so the operator's and the workers' status fields and
conditions (a list map keyed by type) stay theirs.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from k2_api import GROUP, VERSION, ExpertPlacement, K2Serving

FIELD_MANAGER = "k2-eplb"
REBALANCED_AT = "eplb.k2.ai/rebalanced-at"
"""Annotation on the ExpertPlacement: when the controller last wrote a generation (RFC 3339); the cooldown clock."""


class KubeApi(Protocol):
    """What the controller needs from the API server (a fake can stand in for unit tests)."""

    def list_servings(self, namespace: str | None) -> list[K2Serving]: ...

    def get_placement(self, namespace: str, name: str) -> ExpertPlacement | None: ...

    def write_placement(
        self, placement: ExpertPlacement, layers: list[dict[str, Any]], generation: int, reason: str, at: float
    ) -> None: ...

    def apply_status(self, placement: ExpertPlacement, status: dict[str, Any]) -> None: ...

    def post_event(self, placement: ExpertPlacement, event_type: str, reason: str, message: str, at: float) -> None: ...

    def rank_endpoints(self, serving: K2Serving) -> list[str]: ...


class KubeClient:
    """KubeApi over the official synchronous client."""

    def __init__(self, api_client: client.ApiClient):
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @classmethod
    def connect(cls, kubeconfig: Path | None = None) -> KubeClient:
        """From `kubeconfig`, else $KUBECONFIG or ~/.kube/config, else the in-cluster service account."""
        configuration = client.Configuration()
        try:
            path = str(kubeconfig) if kubeconfig else None
            config.load_kube_config(config_file=path, client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return cls(client.ApiClient(configuration))

    def list_servings(self, namespace: str | None) -> list[K2Serving]:
        if namespace:
            answer = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, K2Serving.PLURAL)
        else:
            answer = self.custom.list_cluster_custom_object(GROUP, VERSION, K2Serving.PLURAL)
        return [K2Serving.model_validate(item) for item in _dict(answer)["items"]]

    def get_placement(self, namespace: str, name: str) -> ExpertPlacement | None:
        try:
            body = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, ExpertPlacement.PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return ExpertPlacement.model_validate(body)

    def write_placement(
        self, placement: ExpertPlacement, layers: list[dict[str, Any]], generation: int, reason: str, at: float
    ) -> None:
        meta = placement.metadata
        assert meta.name and meta.namespace and meta.resource_version
        patch = {
            "metadata": {"resourceVersion": meta.resource_version, "annotations": {REBALANCED_AT: rfc3339(at)}},
            "spec": {"layers": layers, "generation": generation, "reason": reason},
        }
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta.namespace,
            ExpertPlacement.PLURAL,
            meta.name,
            patch,
            field_manager=FIELD_MANAGER,
            _content_type="application/merge-patch+json",
        )

    def apply_status(self, placement: ExpertPlacement, status: dict[str, Any]) -> None:
        meta = placement.metadata
        assert meta.name and meta.namespace
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": ExpertPlacement.KIND,
            "metadata": {"name": meta.name, "namespace": meta.namespace},
            "status": status,
        }
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta.namespace,
            ExpertPlacement.PLURAL,
            meta.name,
            body,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def post_event(self, placement: ExpertPlacement, event_type: str, reason: str, message: str, at: float) -> None:
        meta = placement.metadata
        assert meta.name and meta.namespace
        when = dt.datetime.fromtimestamp(at, tz=dt.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{meta.name}.{uuid.uuid4().hex[:12]}", namespace=meta.namespace),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=ExpertPlacement.KIND,
                name=meta.name,
                namespace=meta.namespace,
                uid=meta.uid,
                resource_version=meta.resource_version,
            ),
            type=event_type,
            reason=reason,
            message=message[:1024],
            source=client.V1EventSource(component=FIELD_MANAGER),
            first_timestamp=when,
            last_timestamp=when,
            count=1,
        )
        self.core.create_namespaced_event(meta.namespace, event)

    def rank_endpoints(self, serving: K2Serving) -> list[str]:
        """http://podIP:port/metrics of the serving's running rank pods (selector from status, port named `metrics`)."""
        meta = serving.metadata
        selector = serving.status.selector if serving.status else None
        if not meta.namespace or not selector:
            return []
        pods = self.core.list_namespaced_pod(meta.namespace, label_selector=selector)
        endpoints = []
        for pod in pods.items:
            if pod.spec is None or pod.status is None or pod.status.phase != "Running" or not pod.status.pod_ip:
                continue
            ports = [p.container_port for c in pod.spec.containers for p in (c.ports or []) if p.name == "metrics"]
            if ports:
                endpoints.append(f"http://{pod.status.pod_ip}:{ports[0]}/metrics")
        return endpoints


def rfc3339(at: float) -> str:
    return dt.datetime.fromtimestamp(at, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _dict(answer: object) -> dict[str, Any]:
    assert isinstance(answer, dict)
    return answer
