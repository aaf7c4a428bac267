"""The operator against the real local control plane (kube-apiserver, controller-manager, scheduler, kwok).

Each test starts `k2 operator run --namespace <its namespace>` as a subprocess, so tests of other areas sharing the
cluster are never reconciled. kwok makes pods Ready, completes Job pods after 1s (the K2Training annotation
`k2.ai/fake-run-duration` keeps them running longer: k2.ai/ annotations propagate to the worker pods) and fails pods
annotated `k2.ai/fake-fail`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator.harness import RESYNC_SECONDS, Operator, env_of, running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, exists, get, has_condition, items, patch
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

SERVING = "k2-debug-serve"
TRAINING = "k2-debug-train"
LONG_RUN = {"k2.ai/fake-run-duration": "600s"}
RANKS = f"app.kubernetes.io/instance={SERVING},app.kubernetes.io/component=rank"  # the serving's rank pods


@pytest.fixture
def operator(cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path) -> Iterator[Operator]:
    with running_operator(cluster, namespace, tmp_path) as running:
        yield running
    assert running.errors() == [], running.logs()


def serving_manifest(**spec: Any) -> dict[str, Any]:
    body = kwok_example("k2serving-debug.yaml")
    body["spec"].update(spec)
    return body


def training_manifest(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body = kwok_example("k2training-debug.yaml")
    body["spec"].update(spec)
    if annotations:
        body["metadata"]["annotations"] = annotations
    return body


def instance(name: str) -> str:
    return f"app.kubernetes.io/instance={name}"


def stateful_sets(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        s["metadata"]["name"]: s
        for s in items(cluster, "statefulsets", namespace=namespace, selector=instance(SERVING))
    }


def serving_settled(cluster: Cluster, namespace: str, groups: int) -> dict[str, Any] | None:
    obj = get(cluster, f"k2serving/{SERVING}", namespace=namespace)
    status = obj.get("status", {})
    ok = (
        status.get("readyGroups") == groups
        and status.get("updatedGroups") == groups
        and status.get("observedGeneration") == obj["metadata"]["generation"]
        and (condition(obj, "Progressing") or {}).get("reason") == "RolloutComplete"
    )
    return obj if ok else None


def test_examples_reconcile_and_deleting_the_serving_removes_its_children(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    # PodSecurity admission enforces "restricted": a non-compliant pod would never be created.
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite")
    apply(cluster, serving_manifest(), namespace=namespace)
    apply(cluster, training_manifest(annotations=LONG_RUN), namespace=namespace)
    wait_for(
        "K2Serving Available", lambda: has_condition(cluster, f"k2serving/{SERVING}", "Available", namespace=namespace)
    )
    wait_for("every rank ready", lambda: serving_settled(cluster, namespace, 2))
    placement = get(cluster, f"expertplacement/{SERVING}", namespace=namespace)
    assert placement["spec"]["ranks"] == 2 and placement["spec"]["generation"] == 1
    assert placement["metadata"]["ownerReferences"][0]["kind"] == "K2Serving"

    ranks = items(cluster, "pods", namespace=namespace, selector=RANKS)
    assert len(ranks) == 4
    assert all(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" for p in ranks)

    running = wait_for(
        "K2Training Running", lambda: has_condition(cluster, f"k2training/{TRAINING}", "Running", namespace=namespace)
    )
    assert running["status"]["readyWorkers"] == 2
    workers = items(cluster, "pods", namespace=namespace, selector=instance(TRAINING))
    assert len(workers) == 2
    for pod in workers:
        variables = env_of(pod["spec"]["containers"][0])
        assert variables["WORLD_SIZE"] == "2"
        assert variables["MASTER_ADDR"] == f"{TRAINING}-worker-0-0.{TRAINING}-workers.{namespace}.svc"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert sorted(p["spec"]["hostname"] for p in workers) == [f"{TRAINING}-worker-0-0", f"{TRAINING}-worker-0-1"]

    events = items(cluster, "events", namespace=namespace)
    reasons = {
        (e["involvedObject"]["kind"], e["reason"])
        for e in events
        if e.get("source", {}).get("component") == "k2-operator"
    }
    assert {("K2Serving", "Available"), ("K2Training", "Running")} <= reasons

    cluster.kubectl("delete", "-n", namespace, f"k2serving/{SERVING}", "--wait=true", "--timeout=60s")
    kinds = "statefulsets,deployments,services,configmaps,expertplacements,serviceaccounts,roles,rolebindings,pods"
    wait_for(
        "the serving's children to be garbage-collected",
        lambda: not items(cluster, kinds, namespace=namespace, selector=instance(SERVING)),
        90,
    )
    assert items(cluster, "jobs", namespace=namespace, selector=instance(TRAINING)), "the training is untouched"


def test_serving_scale_update_suspend_resume(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply(cluster, serving_manifest(), namespace=namespace)
    wait_for("2 groups ready", lambda: serving_settled(cluster, namespace, 2))

    cluster.kubectl("scale", "-n", namespace, f"k2serving/{SERVING}", "--replicas=3")  # the scale subresource
    wait_for("3 groups ready", lambda: serving_settled(cluster, namespace, 3))
    assert sorted(stateful_sets(cluster, namespace)) == [f"{SERVING}-g0", f"{SERVING}-g1", f"{SERVING}-g2"]
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/k2.ai/v1alpha1/namespaces/{namespace}/k2servings/{SERVING}/scale"
        ).stdout
    )
    assert scale["status"]["replicas"] == 3 and "app.kubernetes.io/component=rank" in scale["status"]["selector"]

    # Rolling update: a new image restarts one group at a time; the others stay ready throughout.
    patch(cluster, f"k2serving/{SERVING}", {"spec": {"image": "k2-operator/worker:v2"}}, namespace=namespace)
    most_unavailable = 0

    def rolled_out() -> dict[str, Any] | None:
        nonlocal most_unavailable
        sets = stateful_sets(cluster, namespace).values()
        unavailable = sum(1 for s in sets if s.get("status", {}).get("readyReplicas", 0) < 2)
        most_unavailable = max(most_unavailable, unavailable)
        pods = items(cluster, "pods", namespace=namespace, selector=RANKS)
        images = {p["spec"]["containers"][0]["image"] for p in pods if not p["metadata"].get("deletionTimestamp")}
        return (
            serving_settled(cluster, namespace, 3) if images == {"k2-operator/worker:v2"} and len(pods) == 6 else None
        )

    wait_for("the new image on every rank", rolled_out, 120)
    assert most_unavailable <= 1, "more than one group was down at once"

    patch(cluster, f"k2serving/{SERVING}", {"spec": {"groups": 1}}, namespace=namespace)
    wait_for("scale down to 1 group", lambda: list(stateful_sets(cluster, namespace)) == [f"{SERVING}-g0"])
    wait_for("1 group ready", lambda: serving_settled(cluster, namespace, 1))
    services = {
        s["metadata"]["name"] for s in items(cluster, "services", namespace=namespace, selector=instance(SERVING))
    }
    assert services == {SERVING, f"{SERVING}-g0"}

    patch(cluster, f"k2serving/{SERVING}", {"spec": {"suspend": True}}, namespace=namespace)
    suspended = wait_for(
        "Available=False (Suspended)",
        lambda: has_condition(cluster, f"k2serving/{SERVING}", "Available", "False", namespace=namespace),
    )
    assert condition(suspended, "Available")["reason"] == "Suspended"
    wait_for(
        "rank pods gone",
        lambda: not items(cluster, "pods", namespace=namespace, selector=RANKS),
    )
    patch(cluster, f"k2serving/{SERVING}", {"spec": {"suspend": False}}, namespace=namespace)
    wait_for("Available again", lambda: serving_settled(cluster, namespace, 1))


def test_a_steady_resource_causes_no_writes(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply(cluster, serving_manifest(), namespace=namespace)
    apply(cluster, training_manifest(annotations=LONG_RUN), namespace=namespace)
    wait_for("serving settled", lambda: serving_settled(cluster, namespace, 2))
    wait_for(
        "training Running", lambda: has_condition(cluster, f"k2training/{TRAINING}", "Running", namespace=namespace)
    )
    time.sleep(2 * RESYNC_SECONDS)
    refs = [f"k2serving/{SERVING}", f"k2training/{TRAINING}", f"expertplacement/{SERVING}"]
    children = "configmaps,services,serviceaccounts,roles,rolebindings,statefulsets,deployments,jobs"

    def versions() -> dict[str, str]:
        found = {ref: get(cluster, ref, namespace=namespace)["metadata"]["resourceVersion"] for ref in refs}
        for child in items(cluster, children, namespace=namespace, selector="app.kubernetes.io/managed-by=k2-operator"):
            found[f"{child['kind']}/{child['metadata']['name']}"] = child["metadata"]["resourceVersion"]
        return found

    def reconciles() -> float:
        lines = [line for line in operator.metrics().splitlines() if line.startswith("k2_operator_reconciles_total{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before, reconciles_before = versions(), reconciles()
    time.sleep(5 * RESYNC_SECONDS)  # several resync ticks
    assert versions() == before, "a steady resource or child was written"
    assert reconciles() >= reconciles_before + 3 * 3, "the resync kept reconciling all three resources"


def fail_worker(cluster: Cluster, namespace: str, attempt: int) -> None:
    pods = items(cluster, "pods", namespace=namespace, selector=f"{instance(TRAINING)},k2.ai/attempt={attempt}")
    assert pods, f"no pods of attempt {attempt}"
    cluster.kubectl("annotate", "-n", namespace, f"pod/{pods[0]['metadata']['name']}", "k2.ai/fake-fail=1")


def test_worker_failure_restarts_the_gang_then_fails_past_max_restarts(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    apply(cluster, training_manifest(annotations=LONG_RUN, failurePolicy={"maxRestarts": 1}), namespace=namespace)
    ref = f"k2training/{TRAINING}"
    wait_for("Running", lambda: has_condition(cluster, ref, "Running", namespace=namespace))
    fail_worker(cluster, namespace, attempt=0)
    restarted = wait_for(
        "restart 1", lambda: (o := get(cluster, ref, namespace=namespace)) and o["status"].get("restarts") == 1 and o
    )
    assert condition(restarted, "Restarting")["status"] == "True"
    wait_for("the new gang Running", lambda: has_condition(cluster, ref, "Running", namespace=namespace))
    jobs = [j["metadata"]["name"] for j in items(cluster, "jobs", namespace=namespace, selector=instance(TRAINING))]
    assert jobs == [f"{TRAINING}-worker-1"], "the failed gang is gone, one gang runs"
    assert condition(get(cluster, ref, namespace=namespace), "Restarting")["status"] == "False"

    fail_worker(cluster, namespace, attempt=1)
    failed = wait_for("Failed", lambda: has_condition(cluster, ref, "Failed", namespace=namespace))
    assert condition(failed, "Failed")["reason"] == "MaxRestartsExceeded"
    assert failed["status"]["restarts"] == 1
    wait_for(
        "no worker left running",
        lambda: (
            not [
                p
                for p in items(cluster, "pods", namespace=namespace, selector=instance(TRAINING))
                if p["status"].get("phase") == "Running"
            ]
        ),
    )
    time.sleep(3 * RESYNC_SECONDS)
    assert not items(cluster, "jobs", namespace=namespace, selector=instance(TRAINING)), (
        "a failed training starts no new gang"
    )


def test_deleting_a_worker_pod_restarts_the_gang(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply(cluster, training_manifest(annotations=LONG_RUN), namespace=namespace)
    ref = f"k2training/{TRAINING}"
    wait_for("Running", lambda: has_condition(cluster, ref, "Running", namespace=namespace))
    pod = items(cluster, "pods", namespace=namespace, selector=instance(TRAINING))[0]["metadata"]["name"]
    cluster.kubectl("delete", "-n", namespace, f"pod/{pod}", "--wait=false")
    wait_for("restart 1", lambda: (o := get(cluster, ref, namespace=namespace)) and o["status"].get("restarts") == 1)
    wait_for("attempt 1 Running", lambda: has_condition(cluster, ref, "Running", namespace=namespace))


def test_training_suspend_resume_and_success(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply(cluster, training_manifest(annotations=LONG_RUN), namespace=namespace)
    ref = f"k2training/{TRAINING}"
    wait_for("Running", lambda: has_condition(cluster, ref, "Running", namespace=namespace))
    # rank 0's progress report (the workers' merge patch of status.progress) must survive the operator's writes
    patch(cluster, ref, {"status": {"progress": {"step": 7, "loss": 3.5}}}, namespace=namespace, subresource="status")
    patch(cluster, ref, {"spec": {"suspend": True}}, namespace=namespace)
    wait_for("Suspended", lambda: has_condition(cluster, ref, "Suspended", namespace=namespace))
    wait_for(
        "worker pods deleted", lambda: not items(cluster, "pods", namespace=namespace, selector=instance(TRAINING))
    )
    suspended = get(cluster, ref, namespace=namespace)
    assert suspended["status"]["progress"]["step"] == 7
    assert condition(suspended, "Running")["status"] == "False"

    patch(cluster, ref, {"spec": {"suspend": False}}, namespace=namespace)
    resumed = wait_for("Running again", lambda: has_condition(cluster, ref, "Running", namespace=namespace))
    assert resumed["status"]["restarts"] == 0 and resumed["status"]["progress"]["step"] == 7
    # The kwok pods then finish: the gang completes and the training Succeeds.
    for pod in items(cluster, "pods", namespace=namespace, selector=instance(TRAINING)):
        cluster.kubectl(
            "annotate", "-n", namespace, f"pod/{pod['metadata']['name']}", "k2.ai/fake-run-duration=1s", "--overwrite"
        )
    done = wait_for("Succeeded", lambda: has_condition(cluster, ref, "Succeeded", namespace=namespace), 90)
    assert done["status"]["completionTime"]


def test_ttl_deletes_a_finished_training(cluster: Cluster, namespace: str, operator: Operator) -> None:
    apply(cluster, training_manifest(ttlSecondsAfterFinished=2), namespace=namespace)
    wait_for("Succeeded", lambda: has_condition(cluster, f"k2training/{TRAINING}", "Succeeded", namespace=namespace))
    wait_for(
        "deleted by TTL",
        lambda: get(cluster, f"k2training/{TRAINING}", namespace=namespace, missing_ok=True) is None,
        30,
    )


def test_invalid_placement_is_marked_and_the_previous_stays_in_force(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    apply(cluster, serving_manifest(), namespace=namespace)
    ref = f"expertplacement/{SERVING}"
    wait_for(
        "placement generation 1 in force", lambda: exists(cluster, f"configmap/{SERVING}-active", namespace=namespace)
    )
    wait_for("every rank ready", lambda: serving_settled(cluster, namespace, 2))
    for pod in items(cluster, "pods", namespace=namespace, selector=RANKS):
        cluster.kubectl(
            "annotate", "-n", namespace, f"pod/{pod['metadata']['name']}", "k2.ai/applied-placement-generation=1"
        )
    applied = wait_for("Applied", lambda: has_condition(cluster, ref, "Applied", namespace=namespace))
    assert applied["status"]["appliedGeneration"] == 1 and applied["status"]["appliedRanks"] == 4
    wait_for(
        "serving shows generation 1",
        lambda: (
            get(cluster, f"k2serving/{SERVING}", namespace=namespace).get("status", {}).get("placementGeneration") == 1
        ),
    )

    layers = copy.deepcopy(applied["spec"]["layers"])
    layers[0]["slots"] = [[0] * len(row) for row in layers[0]["slots"]]  # experts 1..7 lose every replica
    patch(cluster, ref, {"spec": {"generation": 2, "layers": layers}}, namespace=namespace)
    invalid = wait_for("Invalid", lambda: has_condition(cluster, ref, "Invalid", namespace=namespace))
    assert "experts without a replica" in condition(invalid, "Invalid")["message"]
    active = json.loads(get(cluster, f"configmap/{SERVING}-active", namespace=namespace)["data"]["placement.json"])
    assert active["generation"] == 1
    assert invalid["status"]["appliedGeneration"] == 1


def test_sigkill_mid_reconcile_converges_without_duplicates(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    with running_operator(cluster, namespace, tmp_path) as operator:
        operator.kill()
        # Every apply takes 2 s. A serving reconcile applies its children in waves of at most 8 at once
        # (k2_operator.children): the workloads first, its 4 + 1 NetworkPolicies last, 2 s later.
        operator.start(apply_delay_s=2.0)
        apply(cluster, serving_manifest(groups=4), namespace=namespace)
        apply(cluster, training_manifest(annotations=LONG_RUN), namespace=namespace)
        wait_for("the first group's StatefulSet", lambda: f"{SERVING}-g0" in stateful_sets(cluster, namespace), 30)
        operator.kill()
        partial = items(cluster, "networkpolicies", namespace=namespace, selector=instance(SERVING))
        assert len(partial) < 5, "the reconcile had already finished: not killed mid-reconcile"
        operator.start()
        wait_for("4 groups ready after restart", lambda: serving_settled(cluster, namespace, 4), 90)
        wait_for(
            "training Running", lambda: has_condition(cluster, f"k2training/{TRAINING}", "Running", namespace=namespace)
        )
        assert operator.errors() == []
    assert sorted(stateful_sets(cluster, namespace)) == [f"{SERVING}-g{g}" for g in range(4)]
    assert len(items(cluster, "pods", namespace=namespace, selector=RANKS)) == 8
    assert len(items(cluster, "deployments", namespace=namespace, selector=instance(SERVING))) == 1
    assert len(items(cluster, "expertplacements", namespace=namespace)) == 1
    assert [j["metadata"]["name"] for j in items(cluster, "jobs", namespace=namespace)] == [f"{TRAINING}-worker-0"]
    assert len(items(cluster, "pods", namespace=namespace, selector=instance(TRAINING))) == 2
    everything = items(
        cluster,
        "statefulsets,deployments,services,configmaps,jobs,serviceaccounts,roles,rolebindings",
        namespace=namespace,
    )
    managed = [
        o for o in everything if o["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "k2-operator"
    ]
    orphans = [o["metadata"]["name"] for o in managed if not o["metadata"].get("ownerReferences")]
    assert orphans == []


def test_child_events_drive_reconciles_without_the_resync(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    """With the timer out of the way, Job, StatefulSet, Pod and ExpertPlacement events alone converge everything."""
    with running_operator(cluster, namespace, tmp_path, resync_s=3600) as operator:
        apply(cluster, serving_manifest(), namespace=namespace)
        apply(cluster, training_manifest(), namespace=namespace)  # kwok completes its pods after 1s
        wait_for("every rank ready", lambda: serving_settled(cluster, namespace, 2))
        wait_for(
            "Succeeded", lambda: has_condition(cluster, f"k2training/{TRAINING}", "Succeeded", namespace=namespace)
        )
        for pod in items(cluster, "pods", namespace=namespace, selector=RANKS):
            cluster.kubectl(
                "annotate", "-n", namespace, f"pod/{pod['metadata']['name']}", "k2.ai/applied-placement-generation=1"
            )
        wait_for(
            "the serving shows the applied generation",
            lambda: (
                get(cluster, f"k2serving/{SERVING}", namespace=namespace).get("status", {}).get("placementGeneration")
                == 1
            ),
        )
        assert has_condition(cluster, f"expertplacement/{SERVING}", "Applied", namespace=namespace)
        assert operator.errors() == []
