"""Objects of each kind in each state, as the real reconciles write them on the adapter's fake API server.

The Argo CD health checks (charts/k2-operator/health/) are run on these, and `python -m tests.operator.health_objects`
dumps them into each kind's testdata/ (the `operator-*.yaml` cases of its health_test.yaml)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from k2_api import ExpertPlacement, K2Serving, K2Training
from k2_api.contract import Annotations
from k2_api.kube import Object
from k2_operator import placement, serving, training
from tests.operator.fake_env import NS, Env, rank_pod
from tests.support.paths import ROOT

HEALTH = ROOT / "charts" / "k2-operator" / "health" / "k2.ai"
TRAINING, SERVING = "k2-debug-train", "k2-debug-serve"  # the examples' names
GROUPS, RANKS_PER_GROUP = 2, 2  # examples/k2serving-debug.yaml

Build = Callable[[], Object]


# --- K2Training ---------------------------------------------------------------------------------------------------


def _trained(*job_statuses: dict[str, object], **spec: object) -> Object:
    """The example training reconciled once, then once more after each Job status (of the attempt in force)."""
    env = Env()
    env.create_example("k2training-debug.yaml", **spec)
    env.run(training.reconcile, TRAINING)
    for job_status in job_statuses:
        (job,) = env.names("Job")
        env.set_status("Job", job, job_status)
        env.run(training.reconcile, TRAINING)
        env.run(training.reconcile, TRAINING)  # a restart deletes the old Job on one pass and creates the next
    return env.get(K2Training.KIND, TRAINING)


def _failed_job() -> dict[str, object]:
    condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod failed"}
    return {"conditions": [condition]}


def training_stale() -> Object:
    """Reconciled, then the user edits the spec: observedGeneration is behind until the next reconcile."""
    env = Env()
    env.create_example("k2training-debug.yaml")
    env.run(training.reconcile, TRAINING)
    env.patch_spec(K2Training.KIND, TRAINING, steps=7)
    return env.get(K2Training.KIND, TRAINING)


def training_creating() -> Object:
    return _trained()


def training_running() -> Object:
    return _trained({"active": 2, "ready": 2})


def training_restarting() -> Object:
    return _trained(_failed_job())


def training_suspended() -> Object:
    return _trained(suspend=True)


def training_failed() -> Object:
    return _trained(_failed_job(), _failed_job(), _failed_job())  # failurePolicy.maxRestarts: 2


def training_succeeded() -> Object:
    return _trained({"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 2})


# --- K2Serving and its ExpertPlacement ----------------------------------------------------------------------------


def _served(**spec: object) -> Env:
    env = Env()
    env.create_example("k2serving-debug.yaml", **spec)
    env.run(serving.reconcile, SERVING)
    return env


def _groups_ready(env: Env, ready: tuple[int, ...] = (2, 2)) -> None:
    """Each group's StatefulSet reports `ready[g]` ready ranks of the latest template; the frontend is ready."""
    for group, ready_ranks in enumerate(ready):
        name = f"{SERVING}-g{group}"
        generation = env.get("StatefulSet", name)["metadata"]["generation"]
        status = {"observedGeneration": generation, "replicas": 2, "readyReplicas": ready_ranks, "updatedReplicas": 2}
        env.set_status("StatefulSet", name, status)
    env.set_status("Deployment", f"{SERVING}-frontend", {"replicas": 1, "readyReplicas": 1})


def _ranks_report(env: Env, generation: int) -> None:
    """Every rank pod runs and reports `generation`, as the serving workers do."""
    for group in range(GROUPS):
        for rank in range(RANKS_PER_GROUP):
            pod = rank_pod(SERVING, group, rank, annotations={Annotations.APPLIED_GENERATION: str(generation)})
            name = pod["metadata"]["name"]
            if env.user.create(pod) is None:
                version = env.get("Pod", name)["metadata"]["resourceVersion"]
                env.user.merge_patch("Pod", NS, name, {"metadata": pod["metadata"]}, version)
            env.set_status("Pod", name, {"phase": "Running"}, manager="kubelet")


def _healthy_serving() -> Env:
    """Both groups and the frontend ready, placement generation 1 applied by every rank."""
    env = _served()
    _groups_ready(env)
    _ranks_report(env, 1)
    env.run(placement.reconcile, SERVING)
    env.run(serving.reconcile, SERVING)
    return env


def _new_placement_generation(env: Env, valid: bool) -> None:
    """The EPLB controller writes generation 2 (with a layer whose expert 7 has no replica unless `valid`)."""
    current = env.get(ExpertPlacement.KIND, SERVING)
    layers = copy.deepcopy(current["spec"]["layers"])
    if not valid:
        (first,) = [entry for entry in layers if entry["layer"] == 0]
        first["slots"] = [[0, 1, 2, 3, 4], [5, 6, 0, 1, 2]]
    patch = {"spec": {"generation": 2, "layers": layers}}
    version = current["metadata"]["resourceVersion"]
    env.cluster.client("k2-eplb").merge_patch(ExpertPlacement.KIND, NS, SERVING, patch, version)
    env.run(placement.reconcile, SERVING)
    env.run(serving.reconcile, SERVING)


def serving_stale() -> Object:
    env = _served()
    env.patch_spec(K2Serving.KIND, SERVING, groups=3)
    return env.get(K2Serving.KIND, SERVING)


def serving_creating() -> Object:
    return _served().get(K2Serving.KIND, SERVING)


def serving_available() -> Object:
    return _healthy_serving().get(K2Serving.KIND, SERVING)


def serving_rebalancing() -> Object:
    env = _healthy_serving()
    _new_placement_generation(env, valid=True)
    return env.get(K2Serving.KIND, SERVING)


def serving_degraded() -> Object:
    env = _healthy_serving()
    _groups_ready(env, (2, 0))
    env.run(serving.reconcile, SERVING)
    return env.get(K2Serving.KIND, SERVING)


def serving_frontend_down() -> Object:
    """Every group ready but no frontend replica: nothing routes to them, and no rollout explains it."""
    env = _healthy_serving()
    env.set_status("Deployment", f"{SERVING}-frontend", {"replicas": 1, "readyReplicas": 0})
    env.run(serving.reconcile, SERVING)
    return env.get(K2Serving.KIND, SERVING)


def serving_suspended() -> Object:
    env = _served(suspend=True)
    env.run(serving.reconcile, SERVING)
    return env.get(K2Serving.KIND, SERVING)


def placement_applying() -> Object:
    env = _served()
    env.run(placement.reconcile, SERVING)
    return env.get(ExpertPlacement.KIND, SERVING)


def placement_applied() -> Object:
    return _healthy_serving().get(ExpertPlacement.KIND, SERVING)


def placement_applying_next() -> Object:
    env = _healthy_serving()
    _new_placement_generation(env, valid=True)
    return env.get(ExpertPlacement.KIND, SERVING)


def placement_invalid() -> Object:
    env = _healthy_serving()
    _new_placement_generation(env, valid=False)
    return env.get(ExpertPlacement.KIND, SERVING)


def placement_suspended() -> Object:
    """Applied by every rank, then the serving is suspended: its ranks are gone."""
    env = _healthy_serving()
    env.patch_spec(K2Serving.KIND, SERVING, suspend=True)
    env.run(serving.reconcile, SERVING)
    for pod in env.names("Pod"):
        env.user.delete("Pod", NS, pod)
    env.run(placement.reconcile, SERVING)
    return env.get(ExpertPlacement.KIND, SERVING)


# (kind, case) -> (builder, expected health status, a substring of the expected message)
CASES: dict[tuple[str, str], tuple[Build, str, str]] = {
    (K2Training.KIND, "stale"): (training_stale, "Progressing", "observe generation 2"),
    (K2Training.KIND, "creating"): (training_creating, "Progressing", "Waiting for workers: 0/2 workers ready"),
    (K2Training.KIND, "running"): (training_running, "Healthy", "Running: 2/2 workers ready"),
    (K2Training.KIND, "restarting"): (training_restarting, "Progressing", "Restarting: gang restart 1/2 after"),
    (K2Training.KIND, "suspended"): (training_suspended, "Suspended", "spec.suspend is true"),
    (K2Training.KIND, "failed"): (training_failed, "Degraded", "maxRestarts=2 reached"),
    (K2Training.KIND, "succeeded"): (training_succeeded, "Healthy", "Succeeded"),
    (K2Serving.KIND, "stale"): (serving_stale, "Progressing", "observe generation 2"),
    (K2Serving.KIND, "creating"): (serving_creating, "Progressing", "0/2 groups ready"),
    (K2Serving.KIND, "available"): (serving_available, "Healthy", "2/2 groups ready, 2/2 updated"),
    (K2Serving.KIND, "rebalancing"): (serving_rebalancing, "Healthy", "rebalancing: placement generation 2"),
    (K2Serving.KIND, "degraded"): (serving_degraded, "Degraded", "1/2 groups ready"),
    (K2Serving.KIND, "frontend-down"): (serving_frontend_down, "Degraded", "Not available (FrontendNotReady)"),
    (K2Serving.KIND, "suspended"): (serving_suspended, "Suspended", "spec.suspend is true"),
    (ExpertPlacement.KIND, "applying"): (placement_applying, "Progressing", "0/4 ranks run generation 1"),
    (ExpertPlacement.KIND, "applied"): (placement_applied, "Healthy", "4/4 ranks run generation 1"),
    (ExpertPlacement.KIND, "applying-next"): (placement_applying_next, "Progressing", "ranks run generation 2"),
    (ExpertPlacement.KIND, "invalid"): (placement_invalid, "Degraded", "experts without a replica: 7"),
    (ExpertPlacement.KIND, "suspended"): (placement_suspended, "Suspended", "suspended"),
}


PINNED_TIME = "2026-01-01T00:00:00Z"
TIME_FIELDS = ("startTime", "completionTime", "lastAppliedTime")


def for_testdata(obj: Object) -> Object:
    """`obj` without the server's bookkeeping (managedFields, uid, resourceVersion), its times pinned to
    PINNED_TIME so that a rerun only shows real changes."""
    body = copy.deepcopy(obj)
    meta = body["metadata"]
    for key in ("managedFields", "uid", "resourceVersion", "creationTimestamp"):
        meta.pop(key, None)
    for ref in meta.get("ownerReferences", []):
        ref.pop("uid", None)
    status = body.get("status", {})
    for key in TIME_FIELDS:
        if status.get(key):
            status[key] = PINNED_TIME
    for condition in status.get("conditions", []):
        condition["lastTransitionTime"] = PINNED_TIME
    return body


def case_path(kind: str, case: str) -> Path:
    return HEALTH / kind / "testdata" / f"operator-{case}.yaml"


def main() -> None:
    for (kind, case), (build, _, _) in CASES.items():
        path = case_path(kind, case)
        path.write_text(yaml.safe_dump(for_testdata(build()), sort_keys=False))
        print(path.relative_to(ROOT), file=sys.stderr)


if __name__ == "__main__":
    main()
