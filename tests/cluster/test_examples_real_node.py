"""The debug examples on the real node: the operator's pods run the real `k2 worker ...` commands from the image.

Nothing here is faked by kwok: the kubelet pulls nothing (the image is imported), mounts the ConfigMaps, the
emptyDirs and the ServiceAccount token, fills the downward API, runs the readiness probes, and the pods find each
other by their headless-Service DNS names. The examples are applied as they are, except for two fields:
`spec.scheduling.nodeSelector` pins the pods to the real node (the scheduler prefers the roomier kwok nodes), and
`spec.resources` asks for less CPU, because the real node has this machine's two CPUs and both examples ask one per
pod.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.real_node import has_real_node, skip_unless_a_real_node_can_run
from tests.operator.harness import running_operator
from tests.operator.resources import example
from tests.support.cluster import Cluster
from tests.support.kube import apply, get, has_condition, is_ready, items
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

REAL_NODES = {"type": "real"}
# A pod's first start on a loaded 2-core machine (torch import, model build, gloo rendezvous) takes 10-60 s.
START_TIMEOUT_S = 240


@pytest.fixture
def real(cluster: Cluster, k2_crds: list[str]) -> Iterator[Cluster]:
    """The session's cluster, which has the real node wherever one can run (tests/support/fixtures.py)."""
    if not has_real_node(cluster):
        skip_unless_a_real_node_can_run()
        message = "the running cluster has no real node: `make cluster-down && make cluster-up` starts one"
        skip_or_fail(message)
    yield cluster


def _on_the_real_node(name: str, cpu: str) -> dict[str, Any]:
    body = example(name)
    body["spec"]["scheduling"] = {"nodeSelector": REAL_NODES}
    body["spec"]["resources"] = {**body["spec"]["resources"], "cpu": cpu}
    return body


def _pods(cluster: Cluster, namespace: str, selector: str, count: int) -> list[dict[str, Any]]:
    """The `count` pods matching `selector` once all of them are Ready."""

    def ready() -> list[dict[str, Any]] | None:
        pods = items(cluster, "pods", namespace=namespace, selector=selector)
        return pods if len(pods) == count and all(is_ready(p) for p in pods) else None

    pods: list[dict[str, Any]] = wait_for(f"{count} Ready pods {selector}", ready, START_TIMEOUT_S)
    return pods


def _logs(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> str:
    return cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout


def _step_lines(log: str) -> list[dict[str, Any]]:
    """The JSON progress lines `k2 worker train` prints, one per optimizer step."""
    lines = [line for line in log.splitlines() if line.startswith("{")]
    return [record for record in map(json.loads, lines) if "step" in record]


def test_the_training_example_trains_on_the_real_node(real: Cluster, namespace: str, tmp_path: Path) -> None:
    with running_operator(real, namespace, tmp_path) as operator:
        apply(real, _on_the_real_node("k2training-debug.yaml", cpu="500m"), namespace=namespace)
        selector = "app.kubernetes.io/instance=k2-debug-train"
        pods = _pods(real, namespace, selector, count=2)
        assert {p["spec"]["nodeName"] for p in pods} == {"real-node-0"}
        for pod in pods:
            (status,) = pod["status"]["containerStatuses"]
            assert "running" in status["state"], status
            assert pod["status"]["podIP"].startswith("10.245."), pod["status"]
        # Each rank logs its gloo rendezvous through the first pod's DNS name; rank 0 prints the step lines.
        steps = wait_for(
            "rank 0's first step line",
            lambda: [s for p in pods for s in _step_lines(_logs(real, namespace, p))],
            START_TIMEOUT_S,
        )
        assert steps[0]["step"] == 1 and steps[0]["loss"] > 0, steps[0]
        joined = [p for p in pods if "joined the gloo process group" in _logs(real, namespace, p)]
        assert len(joined) == 2, [_logs(real, namespace, p)[-2000:] for p in pods]
        real.kubectl("delete", "-n", namespace, "k2training/k2-debug-train", "--wait=true", "--timeout=120s")
        assert operator.errors() == [], operator.logs()


def test_the_serving_example_serves_on_the_real_node(real: Cluster, namespace: str, tmp_path: Path) -> None:
    with running_operator(real, namespace, tmp_path) as operator:
        apply(real, _on_the_real_node("k2serving-debug.yaml", cpu="250m"), namespace=namespace)
        selector = "app.kubernetes.io/instance=k2-debug-serve,app.kubernetes.io/component=rank"
        ranks = _pods(real, namespace, selector, count=4)
        assert {p["spec"]["nodeName"] for p in ranks} == {"real-node-0"}
        for rank in ranks:
            log = _logs(real, namespace, rank)
            # The readiness probe (/healthz on the http port) passed, and the rank read the mounted placement.
            assert "listening on 0.0.0.0:" in log and "applied placement generation" in log, log[-2000:]
        # The ranks report the placement they run through the API (their ServiceAccount token), so it is Applied.
        wait_for(
            "ExpertPlacement Applied",
            lambda: has_condition(real, "expertplacement/k2-debug-serve", "Applied", namespace=namespace),
            START_TIMEOUT_S,
        )
        wait_for(
            "readyRanks 4",
            lambda: get(real, "k2serving/k2-debug-serve", namespace=namespace).get("status", {}).get("readyRanks") == 4,
        )
        real.kubectl("delete", "-n", namespace, "k2serving/k2-debug-serve", "--wait=true", "--timeout=120s")
        assert operator.errors() == [], operator.logs()
