"""What the kubelet sees of a serving rank, checked against what the worker does: readiness is the rank's /healthz
on its HTTP port (503 once its group is broken, so the Service and frontend stop sending to it), and there is no
liveness probe (a rank that loads its model answers 503 for minutes; a broken group's ranks exit by themselves, with
ExitCodes.GROUP_BROKEN, and the operator restarts the gang). The pod watch that drives gang restarts is wired to the
K2Serving reconcile."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from k2_api import K2Serving
from k2_api.contract import HttpPaths, Labels, Ports
from k2_operator import serving as serving_module
from k2_operator.builders import serving as serving_builder
from tests.operator.resources import serving


def rank_container() -> dict[str, Any]:
    stateful_set = serving_builder.group_stateful_set(serving(), 0)
    (container,) = stateful_set["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_readiness_is_the_workers_healthz_on_the_rank_http_port_and_there_is_no_liveness_probe() -> None:
    container = rank_container()
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == HttpPaths.HEALTHZ
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[probe["httpGet"]["port"]] == Ports.RANK_HTTP  # where `k2 worker serve` listens by default
    assert "--port" not in container["command"]
    assert "livenessProbe" not in container and "startupProbe" not in container


def test_the_rank_serves_healthz_on_the_port_the_probe_asks() -> None:
    from k2_workers.serve.cli import parse_args as worker_args

    args = worker_args(["--config", "serving.yaml"])
    assert (args.port or Ports.RANK_HTTP) == Ports.RANK_HTTP


def test_a_rank_pod_event_reconciles_its_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[tuple[str, str | None, str | None]] = []

    async def trigger(kind: str, namespace: str | None, name: str | None) -> None:
        fired.append((kind, namespace, name))

    monkeypatch.setattr(serving_module, "trigger", trigger)
    labels = {"app.kubernetes.io/instance": "s", Labels.GROUP: "1", "app.kubernetes.io/component": "rank"}
    body = kopf.Body({"metadata": {"namespace": "ns", "name": "s-g1-0", "labels": labels}})
    asyncio.run(serving_module.on_group_pod(body=body))
    assert fired == [(K2Serving.KIND, "ns", "s")]
