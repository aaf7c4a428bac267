"""A gang restart on the real local control plane (kube-apiserver, controller-manager, scheduler, kwok): deleting one
rank pod of a formed group makes the operator delete its peer too, the StatefulSet recreates both, the group
re-forms and shows one restart in status and a GroupRestart Event, while the other group's pods are never touched.
(The same with real processes exiting with 3 is the lead's real-node e2e.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from k2_api.contract import Annotations, Labels
from tests.operator.harness import running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, get, items
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

SERVING = "k2-debug-serve"
RANKS = f"app.kubernetes.io/instance={SERVING},app.kubernetes.io/component=rank"


def uids(cluster: Cluster, namespace: str, group: int) -> dict[str, str]:
    pods = items(cluster, "pods", namespace=namespace, selector=f"{RANKS},{Labels.GROUP}={group}")
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods if not p["metadata"].get("deletionTimestamp")}


def group_statuses(cluster: Cluster, namespace: str) -> dict[int, dict[str, Any]]:
    status = get(cluster, f"k2serving/{SERVING}", namespace=namespace).get("status", {})
    return {s["group"]: s for s in status.get("groupStatuses", [])}


def formed(cluster: Cluster, namespace: str, group: int) -> dict[str, Any] | None:
    stateful_set = get(cluster, f"statefulset/{SERVING}-g{group}", namespace=namespace, missing_ok=True)
    if stateful_set is None:
        return None
    record = json.loads(stateful_set["metadata"].get("annotations", {}).get(Annotations.GANG, "{}"))
    members = record.get("members", {})
    return record if len(members) == 2 else None


def test_deleting_a_rank_pod_restarts_its_group_and_leaves_the_other_serving(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    apply(cluster, kwok_example("k2serving-debug.yaml"), namespace=namespace)
    with running_operator(cluster, namespace, tmp_path) as operator:
        for group in (0, 1):
            wait_for(f"group {group} formed", lambda g=group: formed(cluster, namespace, g), 120)
        before = {group: uids(cluster, namespace, group) for group in (0, 1)}
        victim = f"{SERVING}-g0-1"
        cluster.kubectl("delete", "-n", namespace, f"pod/{victim}", "--wait=false")

        wait_for("group 0 restarted once", lambda: group_statuses(cluster, namespace).get(0, {}).get("restarts") == 1)

        def reformed() -> dict[str, Any] | None:
            record = formed(cluster, namespace, 0)
            status = group_statuses(cluster, namespace).get(0, {})
            return record if record and status.get("ready") and not status.get("restarting") else None

        record = wait_for("group 0 re-formed", reformed, 120)
        after = uids(cluster, namespace, 0)
        assert set(after) == set(before[0]) and not set(after.values()) & set(before[0].values()), (before, after)
        assert {m["uid"] for m in record["members"].values()} == set(after.values())
        assert uids(cluster, namespace, 1) == before[1], "the other group's pods were touched"
        assert group_statuses(cluster, namespace)[1]["restarts"] == 0
        status = group_statuses(cluster, namespace)[0]
        # Which one the operator saw first depends on how fast kwok lets the pod go and the StatefulSet replaces it.
        whats = ("is being deleted", "is gone", "was deleted and recreated")
        assert status["lastRestartReason"] in {f"rank pod {victim} {what}" for what in whats}
        events = items(cluster, "events", namespace=namespace)
        restarts = [e for e in events if e.get("reason") == "GroupRestart"]
        assert len(restarts) == 1 and restarts[0]["type"] == "Warning", restarts
        assert f"group 0: rank pod {victim}" in restarts[0]["message"]
        assert operator.errors() == [], operator.logs()
