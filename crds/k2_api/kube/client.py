"""`KubeClient`: the `Kube` protocol over the official `kubernetes` client, the only module that imports it.

The client's `ApiClient` does authentication and TLS; requests are built from `resources.RESOURCES` paths, so one
small class serves every kind. Every request has a timeout; throttling (429), server errors (5xx), timeouts and
broken connections are retried with exponential backoff (honouring Retry-After) a bounded number of times, then
raised as `Unavailable`. Every other refusal is mapped to the adapter's exceptions (`errors.from_response`).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from k2_api.kube import errors
from k2_api.kube.events import event_body
from k2_api.kube.protocol import Object, ObjectRef, Selector
from k2_api.kube.resources import resource
from k2_api.kube.selectors import selector_string

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 4
"""Retries after the first try: five tries in all, about 4 s of backoff before `Unavailable`."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    body: Any = None
    content_type: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    data: bytes
    headers: Mapping[str, str]


class TransportError(OSError):
    """No HTTP answer: connection refused or reset, TLS failure, timeout."""


Transport = Callable[[Request, float], Response]
"""Sends one request with a timeout in seconds; raises TransportError when no answer came."""


def api_transport(api_client: client.ApiClient) -> Transport:
    """A Transport over `ApiClient.call_api` (auth, TLS and connection pooling from the official client)."""

    def send(request: Request, timeout_s: float) -> Response:
        headers = {"Accept": "application/json"}
        if request.content_type is not None:
            headers["Content-Type"] = request.content_type
        try:
            serialized = api_client.param_serialize(
                request.method,
                request.path,
                query_params=list(request.query),
                header_params=headers,
                body=request.body,
                auth_settings=["BearerToken"],
            )
            answer = api_client.call_api(*serialized, _request_timeout=timeout_s)
            data = answer.read()  # type: ignore[no-untyped-call]
        except ApiException as error:  # status 0: the client's wrapping of a TLS failure
            raise TransportError(f"{request.method} {request.path}: {error.reason}") from error
        except urllib3.exceptions.HTTPError as error:
            raise TransportError(f"{request.method} {request.path}: {error}") from error
        return Response(answer.status, data or b"", dict(answer.headers or {}))

    return send


class KubeClient:
    """`Kube` over a Transport, with one field manager, a timeout per request and bounded retries."""

    def __init__(
        self,
        transport: Transport,
        field_manager: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: {timeout_s} must be > 0")
        if retries < 0:
            raise ValueError(f"retries: {retries} must be >= 0")
        self.transport = transport
        self._field_manager = field_manager
        self.timeout_s, self.retries = timeout_s, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.sleep = sleep

    @property
    def field_manager(self) -> str:
        return self._field_manager

    def _call(self, request: Request) -> Object:
        delay = self.backoff_s
        attempt = 0
        while True:
            try:
                response = self.transport(request, self.timeout_s)
            except TransportError as error:
                failure: errors.KubeError = errors.Unavailable(str(error))
                wait = delay
            else:
                if 200 <= response.status < 300:
                    decoded: Object = json.loads(response.data) if response.data else {}
                    return decoded
                failure = errors.from_response(response.status, response.data, f"{request.method} {request.path}")
                if not errors.retryable(response.status):
                    raise failure
                wait = retry_after(response.headers) or delay
            if attempt >= self.retries:
                raise failure
            self.sleep(min(wait, self.max_backoff_s))
            delay = min(2 * delay, self.max_backoff_s)
            attempt += 1

    def _write_query(self, force: bool = False) -> tuple[tuple[str, str], ...]:
        return (("fieldManager", self._field_manager),) + ((("force", "true"),) if force else ())

    def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        try:
            return self._call(Request("GET", resource(kind).path(namespace, name)))
        except errors.NotFound:
            return None

    def list(self, kind: str, namespace: str | None = None, selector: Selector | None = None) -> list[Object]:
        res = resource(kind)
        query = (("labelSelector", selector_string(selector)),) if selector else ()
        items: list[Object] = self._call(Request("GET", res.path(namespace), query)).get("items") or []
        for item in items:  # built-in kinds' list items carry neither
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", kind)
        return items

    def apply(self, manifest: Object) -> Object:
        meta = manifest["metadata"]
        path = resource(manifest["kind"]).path(meta.get("namespace"), meta["name"])
        return self._call(Request("PATCH", path, self._write_query(force=True), manifest, APPLY_PATCH))

    def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        res = resource(kind)
        body = {"apiVersion": res.api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}}
        body["status"] = dict(status)
        path = res.path(namespace, name, "status")
        return self._call(Request("PATCH", path, self._write_query(force=True), body, APPLY_PATCH))

    def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        path = resource(manifest["kind"]).path(manifest["metadata"].get("namespace"))
        query = (("fieldManager", field_manager or self._field_manager),)
        try:
            return self._call(Request("POST", path, query, manifest))
        except errors.AlreadyExists:
            return None

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str
    ) -> Object:
        body = copy.deepcopy(dict(patch))
        body.setdefault("metadata", {})["resourceVersion"] = resource_version
        path = resource(kind).path(namespace, name)
        return self._call(Request("PATCH", path, self._write_query(), body, MERGE_PATCH))

    def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        grace_period_s: int | None = None,
    ) -> bool:
        path = resource(kind).path(namespace, name)
        try:
            options: dict[str, Any] = {"propagationPolicy": propagation}
            if grace_period_s is not None:
                options["gracePeriodSeconds"] = grace_period_s
            self._call(Request("DELETE", path, body=options))
        except errors.NotFound:
            return False
        return True

    def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        body = event_body(ref, event_type, reason, message, self._field_manager, dt.datetime.now(dt.UTC))
        self._call(Request("POST", resource("Event").path(ref.namespace), body=body))


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (the API server sends whole seconds); None when absent or a date."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def connect(kubeconfig: Path | None = None, *, field_manager: str, **options: Any) -> KubeClient:
    """A client from `kubeconfig`; without one from $KUBECONFIG or ~/.kube/config, else the in-cluster
    ServiceAccount. `options` go to `KubeClient` (timeout_s, retries, ...)."""
    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return KubeClient(api_transport(client.ApiClient(configuration)), field_manager, **options)
