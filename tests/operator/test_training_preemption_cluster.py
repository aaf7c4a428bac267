"""Preemption against the real Job controller (kube-controller-manager) on kwok pods, with the operator running.

kwok's stages (hack/kwok-stages.yaml) end a pod the way a kubelet reports a worker: `k2.ai/fake-fail` with
`k2.ai/fake-exit-code` and `k2.ai/fake-termination-message`, and a deleted pod ends Failed with
`k2.ai/fake-sigterm-exit-code` (143 unless set: 75 is how `k2 worker train` answers SIGTERM). k2.ai/ annotations of
the K2Training reach every worker pod of every attempt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k2_api.contract import Annotations, ExitCodes
from tests.operator.harness import Operator, running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, get, has_condition, items
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

TRAINING = "k2-debug-train"
REF = f"k2training/{TRAINING}"
INSTANCE = f"app.kubernetes.io/instance={TRAINING}"
PREEMPTED = {
    Annotations.FAKE_FAIL: "1",
    Annotations.FAKE_EXIT_CODE: str(ExitCodes.PREEMPTED),
    Annotations.FAKE_TERMINATION_MESSAGE: "preempted at step 7, checkpoint /checkpoints/step-7",
}


@pytest.fixture
def operator(cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path) -> Iterator[Operator]:
    with running_operator(cluster, namespace, tmp_path) as running:
        yield running
    assert running.errors() == [], running.logs()


def manifest(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    body = kwok_example("k2training-debug.yaml")
    body["spec"].update(spec)
    body["metadata"]["annotations"] = annotations
    return body


def status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return dict(get(cluster, REF, namespace=namespace).get("status", {}))


def test_preempted_gangs_restart_uncounted_and_only_completion_succeeds(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    # maxRestarts 0: one counted restart would fail the training. Every attempt's workers exit PREEMPTED.
    apply(cluster, manifest(PREEMPTED, failurePolicy={"maxRestarts": 0}), namespace=namespace)
    preempted = wait_for(
        "two preemptions", lambda: (s := status(cluster, namespace)).get("preemptions", 0) >= 2 and s, 120
    )
    assert preempted["restarts"] == 0
    body = get(cluster, REF, namespace=namespace)
    assert condition(body, "Failed")["status"] == "False" and condition(body, "Succeeded")["status"] == "False"
    restarting = condition(body, "Restarting")
    if restarting["status"] == "True":
        assert restarting["reason"] == "Preempted"
        assert "(exit code 75): preempted at step 7, checkpoint /checkpoints/step-7" in restarting["message"]

    # The workers stop being preempted: the current attempt runs to completion and only then Succeeded.
    cluster.kubectl("annotate", "-n", namespace, REF, *(f"{key}-" for key in PREEMPTED))
    done = wait_for("Succeeded", lambda: has_condition(cluster, REF, "Succeeded", namespace=namespace), 120)
    assert done["status"]["restarts"] == 0 and done["status"]["preemptions"] >= 2
    assert condition(done, "Failed")["status"] == "False"


def test_a_deleted_worker_that_checkpoints_is_a_preemption(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    sigterm = {"k2.ai/fake-run-duration": "600s", Annotations.FAKE_SIGTERM_EXIT_CODE: str(ExitCodes.PREEMPTED)}
    apply(cluster, manifest(sigterm, failurePolicy={"maxRestarts": 0}), namespace=namespace)
    wait_for("Running", lambda: has_condition(cluster, REF, "Running", namespace=namespace), 120)
    pod = items(cluster, "pods", namespace=namespace, selector=INSTANCE)[0]
    cluster.kubectl("delete", "-n", namespace, f"pod/{pod['metadata']['name']}", "--wait=false")
    wait_for("a preemption", lambda: status(cluster, namespace).get("preemptions") == 1, 120)
    running = wait_for("attempt 1 Running", lambda: has_condition(cluster, REF, "Running", namespace=namespace), 120)
    assert running["status"]["restarts"] == 0
    jobs = [j["metadata"]["name"] for j in items(cluster, "jobs", namespace=namespace, selector=INSTANCE)]
    assert jobs == [f"{TRAINING}-worker-1"]


def test_a_crash_past_max_restarts_fails_naming_the_cause(cluster: Cluster, namespace: str, operator: Operator) -> None:
    cause = "rank 0 failed: FileNotFoundError: [Errno 2] No such file or directory: '/data/missing'"
    crash = {Annotations.FAKE_FAIL: "1", Annotations.FAKE_TERMINATION_MESSAGE: cause}
    apply(cluster, manifest(crash, failurePolicy={"maxRestarts": 1}), namespace=namespace)
    failed = wait_for("Failed", lambda: has_condition(cluster, REF, "Failed", namespace=namespace), 120)
    assert condition(failed, "Failed")["reason"] == "MaxRestartsExceeded"
    assert f"(exit code 1): {cause}" in condition(failed, "Failed")["message"], condition(failed, "Failed")
    assert (failed["status"]["restarts"], failed["status"]["preemptions"]) == (1, 0)


def test_an_evicted_worker_is_a_preemption_whatever_its_exit_code(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    # The eviction API marks the pod DisruptionTarget; the worker then dies with 143 (no checkpoint): still uncounted.
    apply(cluster, manifest({"k2.ai/fake-run-duration": "600s"}, failurePolicy={"maxRestarts": 0}), namespace=namespace)
    wait_for("Running", lambda: has_condition(cluster, REF, "Running", namespace=namespace), 120)
    pod = items(cluster, "pods", namespace=namespace, selector=INSTANCE)[0]["metadata"]["name"]
    eviction = tmp_path / "eviction.json"
    eviction.write_text(
        json.dumps({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}})
    )
    cluster.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{pod}/eviction", "-f", str(eviction))
    wait_for("a preemption", lambda: status(cluster, namespace).get("preemptions") == 1, 120)
    running = wait_for("attempt 1 Running", lambda: has_condition(cluster, REF, "Running", namespace=namespace), 120)
    assert running["status"]["restarts"] == 0
