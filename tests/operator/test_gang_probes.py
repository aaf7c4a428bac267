"""What the kubelet sees of a serving rank, checked against what the worker does: readiness is Kubernetes' own
`grpc:` probe, asking `grpc.health.v1` on the rank's gRPC port for the generation service, which every rank reports
SERVING only while it can serve (NOT_SERVING without a placement, once its group is broken, while it drains), so the
Service and frontend stop sending to it. There is no liveness probe (a rank that loads its model is unready for
minutes; a broken group's ranks exit by themselves, with ExitCodes.GROUP_BROKEN, and the operator restarts the gang).
The pod watch that drives gang restarts is wired to the K2Serving reconcile."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from k2_api import K2Serving
from k2_api.contract import GrpcServices, Labels, PortNames, Ports
from k2_operator import serving as serving_module
from k2_operator.builders import network_policy as policy_builder
from k2_operator.builders import serving as serving_builder
from tests.operator.resources import serving


def rank_container() -> dict[str, Any]:
    stateful_set = serving_builder.group_stateful_set(serving(), 0)
    (container,) = stateful_set["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_readiness_is_a_grpc_health_probe_of_the_generation_service_and_there_is_no_liveness_probe() -> None:
    container = rank_container()
    probe = container["readinessProbe"]
    assert probe["grpc"] == {"port": Ports.GRPC, "service": GrpcServices.GENERATION}
    assert "httpGet" not in probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[PortNames.GRPC] == probe["grpc"]["port"]
    assert "livenessProbe" not in container and "startupProbe" not in container


def test_the_rank_serves_grpc_health_on_the_port_the_probe_asks() -> None:
    from k2_workers.serve.cli import parse_args as worker_args

    container = rank_container()
    command = container["command"]
    assert command[:3] == ["k2", "worker", "serve"]
    args = worker_args(command[3:])
    assert args.grpc_port == container["readinessProbe"]["grpc"]["port"]
    assert args.frontend is False


def test_the_probed_service_follows_the_ranks_readiness() -> None:
    """The worker's health server, asked what the kubelet asks: NOT_SERVING while the rank cannot serve."""
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from k2_workers.serve.grpc_server import serve_grpc

    probe = rank_container()["readinessProbe"]["grpc"]
    unready: list[str | None] = ["no placement applied yet"]
    server = serve_grpc("127.0.0.1", 0, lambda: unready[0])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                request = health_pb2.HealthCheckRequest(service=probe["service"])
                answer: int = health.Check(request, timeout=5).status
                return answer

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            unready[0] = None
            assert status() == health_pb2.HealthCheckResponse.SERVING
            server.drain()
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


def test_the_frontend_grpc_port_comes_from_the_spec() -> None:
    resource = serving()
    resource.spec.frontend.grpc_port = 9090
    deployment = serving_builder.frontend_deployment(resource)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[command.index("--grpc-port") + 1] == "9090"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[PortNames.GRPC] == 9090
    service = serving_builder.frontend_service(resource)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}[PortNames.GRPC] == 9090
    (rule,) = policy_builder.frontend_network_policy(resource)["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {resource.spec.frontend.port, 9090}


def test_a_rank_pod_event_reconciles_its_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[tuple[str, str | None, str | None]] = []

    async def trigger(kind: str, namespace: str | None, name: str | None) -> None:
        fired.append((kind, namespace, name))

    monkeypatch.setattr(serving_module, "trigger", trigger)
    labels = {"app.kubernetes.io/instance": "s", Labels.GROUP: "1", "app.kubernetes.io/component": "rank"}
    body = kopf.Body({"metadata": {"namespace": "ns", "name": "s-g1-0", "labels": labels}})
    asyncio.run(serving_module.on_group_pod(body=body))
    assert fired == [(K2Serving.KIND, "ns", "s")]
