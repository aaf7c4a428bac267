"""The K2Training reconcile against the fake API server: the gang and its children, status written once and only
on change, whole-gang restarts, and a training deleted while its reconcile ran."""

from __future__ import annotations

from k2_api import K2Training
from k2_api.contract import ExitCodes
from k2_api.kube import NotFound
from k2_api.training import BROKEN_GANG_GRACE_S
from k2_operator.builders.training import PREEMPTED_REASON, PREEMPTIONS_ANNOTATION
from k2_operator.training import JOB_NAME_LABEL, reconcile
from tests.operator.fake_env import CONTROLLER_MANAGER, Env, condition, controller_owner_uid

FILE = "k2training-debug.yaml"
NAME = "k2-debug-train"


def test_create_makes_the_owned_gang_and_writes_status_once() -> None:
    env = Env()
    training = env.create_example(FILE)
    env.run(reconcile, NAME)
    assert env.names("Job") == [f"{NAME}-worker-0"]
    children = [o for kind in ("Job", "ConfigMap", "Service") for o in env.user.list(kind, "ns1")]
    assert children and all(controller_owner_uid(c) == training["metadata"]["uid"] for c in children)
    job = env.get("Job", f"{NAME}-worker-0")
    assert job["spec"]["parallelism"] == 2 and job["metadata"]["managedFields"][0]["manager"] == "k2-operator"
    status = env.get(K2Training.KIND, NAME)["status"]
    assert status["observedGeneration"] == 1 and status["restarts"] == 0
    assert condition(env.get(K2Training.KIND, NAME), "Created")["status"] == "True"
    assert env.status_writes(K2Training.KIND) == 1
    # One Event per transition of the kind's own conditions; kstatus' summary of them posts none.
    reasons = [reason for _, reason in env.events()]
    assert "Created" in reasons and not {"Ready", "ReadyCleared", "Reconciling", "ReconcilingCleared"} & set(reasons)
    # Nothing changed: a second pass writes no status and posts no event.
    events = env.events()
    env.run(reconcile, NAME)
    assert env.status_writes(K2Training.KIND) == 1 and env.events() == events


def test_a_failed_gang_is_restarted_whole_until_max_restarts() -> None:
    env = Env()
    env.create_example(FILE)  # failurePolicy.maxRestarts: 2
    env.run(reconcile, NAME)
    for attempt in range(3):
        failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod failed"}
        env.set_status("Job", f"{NAME}-worker-{attempt}", {"conditions": [failed]})
        env.run(reconcile, NAME)
        env.run(reconcile, NAME)  # the old Job is gone; the new one is created on this or the previous pass
        body = env.get(K2Training.KIND, NAME)
        if attempt < 2:
            assert env.names("Job") == [f"{NAME}-worker-{attempt + 1}"]
            assert body["status"]["restarts"] == attempt + 1
            assert condition(body, "Restarting")["status"] == "True"
        else:
            assert env.names("Job") == []  # a failed training stops its gang
            assert condition(body, "Failed")["reason"] == "MaxRestartsExceeded"
    assert ("Warning", "Restarting") in env.events() and ("Warning", "Failed") in env.events()


def test_a_training_deleted_during_its_reconcile_is_left_alone() -> None:
    env = Env()
    env.create_example(FILE)
    env.cluster.fail("apply_status", K2Training.KIND, NotFound("404: gone", 404))
    env.run(reconcile, NAME)  # no exception: nothing left to report on
    assert env.events() == []
    env.user.delete(K2Training.KIND, "ns1", NAME)
    writes = len(env.cluster.calls)
    env.run(reconcile, NAME)
    assert len(env.cluster.calls) == writes  # a missing training: no writes at all


def _worker_pod(env: Env, job: str, index: int, status: dict[str, object]) -> str:
    """The Job's pod `index` as its controller makes it (with its job-name label), with `status`; returns its name."""
    owner = env.get("Job", job)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-{index}-abcde",
            "namespace": "ns1",
            "labels": {**owner["spec"]["template"]["metadata"]["labels"], JOB_NAME_LABEL: job},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": job,
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": "trainer", "image": "i"}]},
    }
    env.cluster.client(CONTROLLER_MANAGER).create(pod)
    env.set_status("Pod", pod["metadata"]["name"], status)
    return str(pod["metadata"]["name"])


def _failed_worker(env: Env, job: str, exit_code: int, message: str) -> str:
    """The Job's pod 0, terminated with `exit_code` and a termination message."""
    terminated = {"exitCode": exit_code, "message": message, "reason": "Error", "finishedAt": "2026-01-01T00:00:00Z"}
    state = {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}
    return _worker_pod(env, job, 0, {"phase": "Failed", **state})


def _grace_deletes(env: Env) -> list[tuple[str, int | None]]:
    pod_deletes = (call for call in env.cluster.calls if (call.verb, call.kind) == ("delete", "Pod"))
    return [(call.name, call.grace_period_s) for call in pod_deletes]


def test_a_crashed_gangs_live_pods_are_deleted_with_the_short_grace_a_preempted_ones_keep_theirs() -> None:
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    job = env.get("Job", f"{NAME}-worker-0")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300  # the preemption grace's default
    _failed_worker(env, f"{NAME}-worker-0", 1, "rank 0 failed: RuntimeError")
    survivor = _worker_pod(env, f"{NAME}-worker-0", 1, {"phase": "Running"})  # its peer is gone: it cannot checkpoint
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod failed"}
    env.set_status("Job", f"{NAME}-worker-0", {"conditions": [failed]})
    env.run(reconcile, NAME)
    assert _grace_deletes(env) == [(survivor, BROKEN_GANG_GRACE_S)]  # the finished pod is left to the Job's deletion
    env.run(reconcile, NAME)
    assert env.names("Job") == [f"{NAME}-worker-1"]

    preempted = Env()
    preempted.create_example(FILE)
    preempted.run(reconcile, NAME)
    _failed_worker(preempted, f"{NAME}-worker-0", ExitCodes.PREEMPTED, "preempted at step 7")
    _worker_pod(preempted, f"{NAME}-worker-0", 1, {"phase": "Running"})  # still writing its part of the checkpoint
    by_policy = {"type": "Failed", "status": "True", "reason": PREEMPTED_REASON, "message": "exit code 75 matched"}
    preempted.set_status("Job", f"{NAME}-worker-0", {"conditions": [by_policy]})
    preempted.run(reconcile, NAME)
    preempted.run(reconcile, NAME)
    assert _grace_deletes(preempted) == [] and preempted.names("Job") == [f"{NAME}-worker-1"]


def test_a_preempted_gang_restarts_without_counting_and_records_it_on_the_new_job() -> None:
    env = Env()
    env.create_example(FILE, failurePolicy={"maxRestarts": 0})  # no restart allowed: a preemption is none
    env.run(reconcile, NAME)
    _failed_worker(env, f"{NAME}-worker-0", ExitCodes.PREEMPTED, "preempted at step 7, checkpoint /checkpoints/step-7")
    by_policy = {"type": "Failed", "status": "True", "reason": PREEMPTED_REASON, "message": "exit code 75 matched"}
    env.set_status("Job", f"{NAME}-worker-0", {"conditions": [by_policy]})
    env.run(reconcile, NAME)
    env.run(reconcile, NAME)
    assert env.names("Job") == [f"{NAME}-worker-1"]
    assert env.get("Job", f"{NAME}-worker-1")["metadata"]["annotations"][PREEMPTIONS_ANNOTATION] == "1"
    body = env.get(K2Training.KIND, NAME)
    assert (body["status"]["restarts"], body["status"]["preemptions"]) == (0, 1)
    restarting = condition(body, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "Preempted")
    assert "preempted at step 7, checkpoint /checkpoints/step-7" in restarting["message"]
    assert condition(body, "Succeeded")["status"] == "False" and condition(body, "Failed")["status"] == "False"


def test_a_crash_past_max_restarts_fails_with_the_pods_termination_message() -> None:
    env = Env()
    env.create_example(FILE, failurePolicy={"maxRestarts": 0})
    env.run(reconcile, NAME)
    cause = "rank 0 failed: FileNotFoundError: [Errno 2] No such file or directory: '/data/missing'"
    _failed_worker(env, f"{NAME}-worker-0", 1, cause)
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "backoff limit"}
    env.set_status("Job", f"{NAME}-worker-0", {"conditions": [failed]})
    env.run(reconcile, NAME)
    body = env.get(K2Training.KIND, NAME)
    message = condition(body, "Failed")["message"]
    assert condition(body, "Failed")["reason"] == "MaxRestartsExceeded"
    assert f"pod {NAME}-worker-0-0-abcde (exit code 1): {cause}" in message, message
    assert env.names("Job") == []
