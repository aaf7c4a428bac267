"""kstatus compliance of what the reconciles write: observedGeneration, and Ready, Reconciling and Stalled that never
contradict each other, in every state of every kind (the objects of tests/operator/health_objects.py).

The verdicts are the real library's, sigs.k8s.io/cli-utils' kstatus, through hack/kstatus (a tiny Go program, built
into .tools/bin/kstatus from the Go module proxy), and `kstatus_of`, its rules for a custom resource written out
(generation, then Reconciling, then Stalled), must agree with it."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from k2_operator.conditions import Desired
from k2_operator.status.kstatus import KSTATUS_TYPES, State, Summary, kstatus_conditions
from tests.operator.harness import running_operator
from tests.operator.health_objects import CASES
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, get, items, patch
from tests.support.paths import TOOLS_BIN
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

# (kind, case) -> (kstatus, Ready)
EXPECTED: dict[tuple[str, str], tuple[str, bool]] = {
    ("K2Training", "stale"): ("InProgress", False),
    ("K2Training", "creating"): ("InProgress", False),
    ("K2Training", "running"): ("Current", True),
    ("K2Training", "restarting"): ("InProgress", False),
    ("K2Training", "suspended"): ("Current", True),
    ("K2Training", "failed"): ("Failed", False),
    ("K2Training", "succeeded"): ("Current", True),
    ("K2Serving", "stale"): ("InProgress", False),
    ("K2Serving", "creating"): ("InProgress", False),
    ("K2Serving", "available"): ("Current", True),
    ("K2Serving", "rebalancing"): ("Current", True),
    ("K2Serving", "degraded"): ("InProgress", False),
    ("K2Serving", "frontend-down"): ("InProgress", False),
    ("K2Serving", "suspended"): ("Current", True),
    ("ExpertPlacement", "applying"): ("InProgress", False),
    ("ExpertPlacement", "applied"): ("Current", True),
    ("ExpertPlacement", "applying-next"): ("InProgress", False),
    ("ExpertPlacement", "invalid"): ("Failed", False),
    ("ExpertPlacement", "suspended"): ("Current", True),
}


def _true(obj: dict[str, Any], condition_type: str) -> bool:
    conditions = obj.get("status", {}).get("conditions", [])
    return any(c["type"] == condition_type and c["status"] == "True" for c in conditions)


def kstatus_of(obj: dict[str, Any]) -> str:
    observed = obj.get("status", {}).get("observedGeneration")
    if observed is None or observed < obj["metadata"]["generation"]:
        return "InProgress"
    if _true(obj, "Reconciling"):
        return "InProgress"
    if _true(obj, "Stalled"):
        return "Failed"
    return "Current"


KSTATUS = TOOLS_BIN / "kstatus"


def real_kstatus(objects: list[dict[str, Any]]) -> list[str] | None:
    """Each object's status by sigs.k8s.io/cli-utils' kstatus.Compute; None when hack/kstatus is not built."""
    if not KSTATUS.is_file():
        return None
    result = subprocess.run(
        [str(KSTATUS)], input=json.dumps(objects), capture_output=True, text=True, check=True, timeout=60
    )
    return [verdict["status"] for verdict in json.loads(result.stdout)]


def assert_kstatus(obj: dict[str, Any], expected: str) -> None:
    assert kstatus_of(obj) == expected, obj.get("status")
    assert real_kstatus([obj]) in (None, [expected]), obj.get("status")


def test_the_real_kstatus_library_agrees_in_every_state() -> None:
    if not KSTATUS.is_file():
        message = f"{KSTATUS} is not built: run `make tools`"
        skip_or_fail(message)
    keys = list(EXPECTED)
    objects = [CASES[key][0]() for key in keys]
    assert real_kstatus(objects) == [EXPECTED[key][0] for key in keys]


def test_the_expectations_cover_every_case() -> None:
    assert set(EXPECTED) == set(CASES)


@pytest.mark.parametrize(("kind", "case"), list(EXPECTED), ids=[f"{k}-{c}" for k, c in EXPECTED])
def test_kstatus_and_ready_in_each_state(kind: str, case: str) -> None:
    obj = CASES[(kind, case)][0]()
    status, ready = EXPECTED[(kind, case)]
    assert (kstatus_of(obj), _true(obj, "Ready")) == (status, ready), obj.get("status")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert set(KSTATUS_TYPES) <= set(conditions)
    assert sum(conditions[t]["status"] == "True" for t in KSTATUS_TYPES) == 1
    assert all(conditions[t]["reason"] for t in KSTATUS_TYPES)  # metav1.Condition requires a reason


def test_ready_carries_the_reason_of_the_state_it_is_not_in() -> None:
    stalled = kstatus_conditions(Summary(State.STALLED, "InvalidSpec", "expert 7 has no replica"))
    assert stalled == [
        Desired("Ready", False, "InvalidSpec", "expert 7 has no replica"),
        Desired("Reconciling", False, "NotReconciling", ""),
        Desired("Stalled", True, "InvalidSpec", "expert 7 has no replica"),
    ]
    suspended = kstatus_conditions(Summary(State.READY, "Suspended", "spec.suspend is true"))
    assert [d.status for d in suspended] == [True, False, False] and suspended[0].reason == "Suspended"
    reconciling = kstatus_conditions(Summary(State.RECONCILING, "RollingUpdate", "1/2 groups updated"))
    assert [d.status for d in reconciling] == [False, True, False] and reconciling[1].reason == "RollingUpdate"


# --- on the local control plane, with the operator running -------------------------------------------------------


def kubectl_wait(cluster: Cluster, namespace: str, condition: str, *refs: str) -> None:
    cluster.kubectl("wait", f"--for=condition={condition}", "-n", namespace, *refs, "--timeout=90s")


def wait_for_kstatus(cluster: Cluster, namespace: str, ref: str, status: str) -> dict[str, Any]:
    """Polls until kstatus (the real library when built, else `kstatus_of`) reads `ref` as `status`."""

    def probe() -> dict[str, Any] | None:
        obj = get(cluster, ref, namespace=namespace)
        found = real_kstatus([obj]) or [kstatus_of(obj)]
        return obj if found == [status] else None

    return wait_for(f"{ref} {status}", probe, 90)


@pytest.mark.integration
def test_kubectl_wait_and_kstatus_through_create_progress_failure_and_recovery(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    serving, training = "k2-debug-serve", "k2-debug-train"
    placement = f"expertplacement/{serving}"
    ranks = f"app.kubernetes.io/instance={serving},app.kubernetes.io/component=rank"
    with running_operator(cluster, namespace, tmp_path) as operator:
        apply(cluster, kwok_example("k2serving-debug.yaml"), namespace=namespace)
        body = kwok_example("k2training-debug.yaml")
        body["metadata"]["annotations"] = {"k2.ai/fake-run-duration": "600s"}
        apply(cluster, body, namespace=namespace)
        kubectl_wait(cluster, namespace, "Ready", f"k2serving/{serving}", f"k2training/{training}")
        assert_kstatus(get(cluster, placement, namespace=namespace), "InProgress")  # no rank reported yet
        assert_kstatus(get(cluster, f"k2serving/{serving}", namespace=namespace), "Current")

        def report(generation: int) -> None:
            for pod in items(cluster, "pods", namespace=namespace, selector=ranks):
                name = f"pod/{pod['metadata']['name']}"
                annotation = f"k2.ai/applied-placement-generation={generation}"
                cluster.kubectl("annotate", "-n", namespace, name, annotation, "--overwrite")

        report(1)
        kubectl_wait(cluster, namespace, "Ready", placement)
        assert_kstatus(get(cluster, placement, namespace=namespace), "Current")

        good = get(cluster, placement, namespace=namespace)["spec"]["layers"]
        bad = copy.deepcopy(good)
        bad[0]["slots"] = [[0] * len(row) for row in bad[0]["slots"]]  # experts 1..7 lose every replica
        patch(cluster, placement, {"spec": {"generation": 2, "layers": bad}}, namespace=namespace)
        kubectl_wait(cluster, namespace, "Stalled", placement)
        assert_kstatus(get(cluster, placement, namespace=namespace), "Failed")

        patch(cluster, placement, {"spec": {"generation": 3, "layers": good}}, namespace=namespace)  # recovery
        wait_for_kstatus(cluster, namespace, placement, "InProgress")
        report(3)
        kubectl_wait(cluster, namespace, "Ready", placement)
        assert_kstatus(get(cluster, placement, namespace=namespace), "Current")

        # Progress: a third group; `kubectl wait` alone would see the old Ready, kstatus sees the generation.
        patch(cluster, f"k2serving/{serving}", {"spec": {"groups": 3}}, namespace=namespace)
        assert_kstatus(get(cluster, f"k2serving/{serving}", namespace=namespace), "InProgress")
        done = wait_for_kstatus(cluster, namespace, f"k2serving/{serving}", "Current")
        assert done["status"]["readyGroups"] == 3

        # Failure: a training whose only attempt fails stalls.
        failing = kwok_example("k2training-debug.yaml")
        failing["metadata"].update(name="k2-kstatus-fail", annotations={"k2.ai/fake-run-duration": "600s"})
        failing["spec"]["failurePolicy"] = {"maxRestarts": 0}
        apply(cluster, failing, namespace=namespace)
        kubectl_wait(cluster, namespace, "Ready", "k2training/k2-kstatus-fail")
        workers = items(cluster, "pods", namespace=namespace, selector="app.kubernetes.io/instance=k2-kstatus-fail")
        cluster.kubectl("annotate", "-n", namespace, f"pod/{workers[0]['metadata']['name']}", "k2.ai/fake-fail=1")
        kubectl_wait(cluster, namespace, "Stalled", "k2training/k2-kstatus-fail")
        assert_kstatus(get(cluster, "k2training/k2-kstatus-fail", namespace=namespace), "Failed")
        assert operator.errors() == [], operator.logs()
