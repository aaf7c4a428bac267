"""KubeClient without a cluster: a recording transport stands in for the API server (paths, queries, bodies,
timeouts, error mapping, retries with backoff and Retry-After)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from k2_api.kube import AlreadyExists, Conflict, Forbidden, Invalid, KubeError, NotFound, ObjectRef, Unavailable
from k2_api.kube.client import KubeClient, Request, Response, TransportError, retry_after
from k2_api.kube.resources import resource

OK: Any = {"metadata": {"name": "x"}}


def status_body(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"kind": "Status", "code": code, "reason": reason, "message": message}).encode()


class Transport:
    """Answers from a script (a Response, or an exception to raise), records requests and timeouts."""

    def __init__(self, *answers: Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[Request] = []
        self.timeouts: list[float] = []

    def __call__(self, request: Request, timeout_s: float) -> Response:
        self.requests.append(request)
        self.timeouts.append(timeout_s)
        answer = self.answers.pop(0) if self.answers else ok(OK)
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(body: Any) -> Response:
    return Response(200, json.dumps(body).encode(), {})


def failing(code: int, reason: str = "", headers: Mapping[str, str] | None = None) -> Response:
    return Response(code, status_body(code, reason, f"failed with {code}"), dict(headers or {}))


def client(transport: Transport, **options: Any) -> tuple[KubeClient, list[float]]:
    sleeps: list[float] = []
    return KubeClient(transport, "k2-test", timeout_s=7.0, sleep=sleeps.append, **options), sleeps


def test_paths_of_core_grouped_and_custom_kinds() -> None:
    assert resource("Job").path("ns", "j") == "/apis/batch/v1/namespaces/ns/jobs/j"
    assert resource("ConfigMap").path("ns") == "/api/v1/namespaces/ns/configmaps"
    assert resource("K2Serving").path(None) == "/apis/k2.ai/v1alpha1/k2servings"
    placement_status = resource("ExpertPlacement").path("ns", "x", "status")
    assert placement_status == "/apis/k2.ai/v1alpha1/namespaces/ns/expertplacements/x/status"
    with pytest.raises(ValueError, match="kind: 'Widget'"):
        resource("Widget")


def test_writes_carry_the_field_manager_and_every_call_a_timeout() -> None:
    transport = Transport()
    kube, _ = client(transport)
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}
    kube.apply(manifest)
    kube.apply_status("ExpertPlacement", "ns", "x", {"appliedGeneration": 2})
    kube.create(manifest)
    kube.merge_patch("ExpertPlacement", "ns", "x", {"spec": {"generation": 3}}, "41")
    kube.get("Pod", "ns", "p")
    apply, status, create, patch, get = transport.requests
    assert (apply.method, apply.path, apply.content_type) == (
        "PATCH",
        "/api/v1/namespaces/ns/configmaps/c",
        "application/apply-patch+yaml",
    )
    assert apply.query == (("fieldManager", "k2-test"), ("force", "true")) and apply.body == manifest
    assert status.path.endswith("/expertplacements/x/status") and status.query == apply.query
    assert status.body == {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "ExpertPlacement",
        "metadata": {"name": "x", "namespace": "ns"},
        "status": {"appliedGeneration": 2},
    }
    assert (create.method, create.path, create.query) == (
        "POST",
        "/api/v1/namespaces/ns/configmaps",
        (("fieldManager", "k2-test"),),
    )
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"spec": {"generation": 3}, "metadata": {"resourceVersion": "41"}}
    assert get.method == "GET" and get.query == ()
    assert transport.timeouts == [7.0] * 5


def test_list_sends_the_selector_and_fills_in_kind() -> None:
    transport = Transport(ok({"items": [{"metadata": {"name": "p"}}]}))
    kube, _ = client(transport)
    (pod,) = kube.list("Pod", "ns", {"b": "2", "a": "1"})
    assert transport.requests[0].query == (("labelSelector", "a=1,b=2"),)
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")


def test_absence_is_an_answer_where_the_protocol_says_so() -> None:
    transport = Transport(failing(404, "NotFound"), failing(404, "NotFound"), failing(409, "AlreadyExists"))
    kube, _ = client(transport)
    assert kube.get("Pod", "ns", "gone") is None
    assert kube.delete("Pod", "ns", "gone") is False
    assert kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}) is None
    assert transport.requests[1].body == {"propagationPolicy": "Background"}


@pytest.mark.parametrize(
    ("code", "reason", "error"),
    [
        (404, "NotFound", NotFound),
        (409, "Conflict", Conflict),
        (409, "AlreadyExists", AlreadyExists),
        (403, "Forbidden", Forbidden),
        (401, "Unauthorized", Forbidden),
        (422, "Invalid", Invalid),
        (400, "BadRequest", Invalid),
        (405, "MethodNotAllowed", KubeError),
    ],
)
def test_http_codes_map_to_the_adapters_exceptions(code: int, reason: str, error: type[KubeError]) -> None:
    kube, sleeps = client(Transport(failing(code, reason)))
    with pytest.raises(error) as raised:
        kube.merge_patch("ExpertPlacement", "ns", "x", {}, "1")
    assert type(raised.value) is error and raised.value.status == code
    assert f"failed with {code}" in str(raised.value) and "/expertplacements/x" in str(raised.value)
    assert sleeps == []  # not retried


def test_server_errors_and_throttling_are_retried_with_backoff() -> None:
    transport = Transport(failing(503), failing(500), failing(429, headers={"Retry-After": "3"}), ok({"items": []}))
    kube, sleeps = client(transport)
    assert kube.list("Pod", "ns") == []
    assert sleeps == [0.25, 0.5, 3.0]  # doubling backoff; Retry-After wins when it is given
    assert len(transport.requests) == 4


def test_retries_are_bounded_then_unavailable() -> None:
    transport = Transport(*[failing(500)] * 10)
    kube, sleeps = client(transport, retries=2)
    with pytest.raises(Unavailable, match="500"):
        kube.get("Pod", "ns", "p")
    assert len(transport.requests) == 3 and sleeps == [0.25, 0.5]


def test_no_answer_is_retried_then_unavailable() -> None:
    transport = Transport(TransportError("connection refused"), TransportError("timed out"), ok(OK))
    kube, sleeps = client(transport)
    assert kube.get("Pod", "ns", "x") == OK
    assert sleeps == [0.25, 0.5]
    transport = Transport(*[TransportError("connection refused")] * 3)
    kube, _ = client(transport, retries=2)
    with pytest.raises(Unavailable, match="connection refused"):
        kube.get("Pod", "ns", "x")


def test_backoff_is_capped() -> None:
    kube, sleeps = client(Transport(*[failing(502)] * 6), retries=5, max_backoff_s=1.0)
    with pytest.raises(Unavailable):
        kube.get("Pod", "ns", "x")
    assert sleeps == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_retry_after_reads_seconds_only() -> None:
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}) is None
    assert retry_after({}) is None


def test_events_come_from_the_field_manager() -> None:
    transport = Transport()
    kube, _ = client(transport)
    kube.event(ObjectRef("k2.ai/v1alpha1", "K2Serving", "ns", "s", uid="u1"), "Warning", "Degraded", "x" * 2000)
    (request,) = transport.requests
    assert (request.method, request.path) == ("POST", "/api/v1/namespaces/ns/events")
    body = request.body
    assert body["metadata"]["name"].startswith("s.") and body["metadata"]["namespace"] == "ns"
    assert body["involvedObject"] == {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Serving",
        "name": "s",
        "namespace": "ns",
        "uid": "u1",
    }
    assert (body["type"], body["reason"], len(body["message"])) == ("Warning", "Degraded", 1024)
    assert body["source"] == {"component": "k2-test"} and body["reportingComponent"] == "k2-test"


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        KubeClient(Transport(), "m", timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        KubeClient(Transport(), "m", retries=-1)
