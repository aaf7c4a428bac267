"""On the real API server: a steady serving's children are not applied again resync after resync (the operator's
`k2_operator_child_applies_total` stops counting `applied`), and a child someone edits by hand is put back, a watched
workload (the frontend Deployment) and an unwatched ConfigMap alike."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.operator.harness import RESYNC_SECONDS, Operator, running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, get
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

SERVING = "k2-debug-serve"


def child_applies(operator: Operator, result: str) -> dict[str, float]:
    """`k2_operator_child_applies_total` by kind, for one result (applied or unchanged)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            if sample.name == "k2_operator_child_applies_total" and sample.labels["result"] == result:
                counts[sample.labels["kind"]] = sample.value
    return counts


def settled(operator: Operator) -> bool:
    """No child applied over three resyncs (status updates of the workloads cost one no-op apply each)."""
    before = child_applies(operator, "applied")
    time.sleep(3 * RESYNC_SECONDS)
    return child_applies(operator, "applied") == before


@pytest.fixture
def operator(cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path) -> Iterator[Operator]:
    with running_operator(cluster, namespace, tmp_path) as running:
        yield running
    assert running.errors() == [], running.logs()


def test_a_steady_serving_is_not_applied_again_and_a_hand_edit_is_repaired(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    apply(cluster, kwok_example("k2serving-debug.yaml"), namespace=namespace)
    wait_for(
        "the serving reconciled",
        lambda: (get(cluster, f"k2serving/{SERVING}", namespace=namespace).get("status") or {}).get("groups") == 2,
        timeout_s=90,
    )
    wait_for("no more applies", lambda: settled(operator), timeout_s=120)
    applied, unchanged = child_applies(operator, "applied"), child_applies(operator, "unchanged")
    assert applied["StatefulSet"] >= 2 and applied["ConfigMap"] >= 1
    wait_for(
        "more resyncs",
        lambda: child_applies(operator, "unchanged").get("ConfigMap", 0) >= unchanged.get("ConfigMap", 0) + 3,
        timeout_s=30,
    )
    assert child_applies(operator, "applied") == applied, "a steady child was applied again"

    config = get(cluster, f"configmap/{SERVING}-model", namespace=namespace)
    edit = json.dumps({"data": {"model.json": "{}"}})
    cluster.kubectl("patch", "-n", namespace, f"configmap/{SERVING}-model", "--type=merge", "-p", edit)
    cluster.kubectl("scale", "-n", namespace, f"deployment/{SERVING}-frontend", "--replicas=2")
    wait_for(
        "the ConfigMap repaired",
        lambda: get(cluster, f"configmap/{SERVING}-model", namespace=namespace)["data"] == config["data"],
        timeout_s=30,
    )
    wait_for(
        "the Deployment repaired",
        lambda: get(cluster, f"deployment/{SERVING}-frontend", namespace=namespace)["spec"]["replicas"] == 1,
        timeout_s=30,
    )
    after = child_applies(operator, "applied")
    assert after["ConfigMap"] >= applied["ConfigMap"] + 1 and after["Deployment"] >= applied["Deployment"] + 1
