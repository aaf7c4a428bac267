"""The pure decisions: training attempts and terminal states, serving rollout and conditions, placement validity."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from k2_api import K2Training
from k2_api.contract import Labels
from k2_operator.builders import placement as placement_builder
from k2_operator.builders.training import PREEMPTED_REASON, PREEMPTIONS_ANNOTATION, job_name
from k2_operator.conditions import Desired, changed, merge, normalized, transitions
from k2_operator.status import placement as placement_status
from k2_operator.status import training as training_status
from k2_operator.status.serving import GroupState, group_state, groups_to_restart, serving_status
from tests.operator.resources import serving, stored, training

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def later(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def job(resource: K2Training, attempt: int, condition: str | None = None, ready: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = {"ready": ready}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded"}]
    return {
        "metadata": {"name": job_name(resource, attempt), "labels": {Labels.ATTEMPT: str(attempt)}},
        "status": status,
    }


def with_status(resource: K2Training, status: dict[str, Any]) -> K2Training:
    body = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = status
    return K2Training.model_validate(body)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_new_training_runs_attempt_zero_and_is_running_when_all_workers_ready() -> None:
    resource = training()
    first = training_status.plan(resource, [], T0)
    assert (first.attempt, first.run_gang, first.delete_jobs) == (0, True, [])
    assert condition(first.status, "Created")["status"] == "True"
    assert condition(first.status, "Running")["status"] == "False"
    running = training_status.plan(with_status(resource, first.status), [job(resource, 0, ready=2)], later(5))
    assert condition(running.status, "Running")["status"] == "True"
    assert running.status["readyWorkers"] == 2
    assert running.status["startTime"] == first.status["startTime"]


def test_failed_gang_restarts_until_max_restarts_then_fails() -> None:
    resource = training(failurePolicy={"maxRestarts": 1})
    status = training_status.plan(resource, [], T0).status
    restart = training_status.plan(with_status(resource, status), [job(resource, 0, "Failed")], later(1))
    assert (restart.attempt, restart.run_gang) == (1, True)
    assert restart.delete_jobs == [job_name(resource, 0)]
    assert restart.status["restarts"] == 1
    assert condition(restart.status, "Restarting")["status"] == "True"
    final = training_status.plan(with_status(resource, restart.status), [job(resource, 1, "Failed")], later(2))
    assert final.run_gang is False
    assert condition(final.status, "Failed")["reason"] == "MaxRestartsExceeded"
    assert final.status["restarts"] == 1
    assert final.delete_jobs == [job_name(resource, 1)]  # the failed gang is stopped
    assert final.status["completionTime"] == "2026-01-01T00:00:02Z"


def test_attempt_is_recovered_from_jobs_when_status_was_not_written() -> None:
    resource = training()
    decision = training_status.plan(resource, [job(resource, 0), job(resource, 1)], T0)
    assert decision.attempt == 1
    assert decision.delete_jobs == [job_name(resource, 0)]


def failed_job(resource: K2Training, attempt: int, reason: str, preemptions: int = 0) -> dict[str, Any]:
    """A Job of `attempt` that its controller failed with `reason` (PodFailurePolicy: a preemption rule matched)."""
    body = job(resource, attempt)
    body["metadata"] |= {"uid": f"job-{attempt}", "annotations": {PREEMPTIONS_ANNOTATION: str(preemptions)}}
    body["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": reason, "message": "m"}]
    return body


def worker_pod(attempt: int, index: int, exit_code: int, message: str, finished: str) -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "message": message, "finishedAt": finished, "reason": "Error"}
    return {
        "metadata": {"name": f"w-{attempt}-{index}", "ownerReferences": [{"uid": f"job-{attempt}"}]},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


def test_a_preempted_gang_restarts_without_counting_even_past_max_restarts() -> None:
    resource = training(failurePolicy={"maxRestarts": 0})
    status = training_status.plan(resource, [], T0).status
    pods = [worker_pod(0, 0, 75, "preempted at step 7, checkpoint /ckpt/step-7", "2026-01-01T00:00:01Z")]
    decision = training_status.plan(
        with_status(resource, status), [failed_job(resource, 0, PREEMPTED_REASON)], later(1), pods
    )
    assert (decision.attempt, decision.preemptions, decision.run_gang) == (1, 1, True)
    assert (decision.status["restarts"], decision.status["preemptions"]) == (0, 1)
    assert decision.delete_jobs == [job_name(resource, 0)]
    restarting = condition(decision.status, "Restarting")
    assert (restarting["status"], restarting["reason"]) == ("True", "Preempted")
    assert "pod w-0-0 (exit code 75): preempted at step 7, checkpoint /ckpt/step-7" in restarting["message"]
    assert condition(decision.status, "Succeeded")["status"] == "False"
    assert condition(decision.status, "Failed")["status"] == "False"
    # The next attempt runs: Restarting clears, counters stay; a second preemption is counted the same way.
    running = training_status.plan(with_status(resource, decision.status), [job(resource, 1, ready=2)], later(2))
    assert condition(running.status, "Restarting")["status"] == "False" and running.status["preemptions"] == 1
    again = training_status.plan(
        with_status(resource, running.status), [failed_job(resource, 1, PREEMPTED_REASON, 1)], later(3)
    )
    assert (again.attempt, again.status["restarts"], again.status["preemptions"]) == (2, 0, 2)


def test_only_a_complete_job_succeeds_after_preemptions() -> None:
    resource = training()
    status = with_status(resource, {"restarts": 1, "preemptions": 2})
    assert training_status.plan(status, [job(resource, 3)], T0).status["preemptions"] == 2
    done = training_status.plan(status, [job(resource, 3, "Complete")], T0)
    assert condition(done.status, "Succeeded")["status"] == "True" and done.run_gang is False
    assert (done.status["restarts"], done.status["preemptions"]) == (1, 2)


def test_a_crash_past_max_restarts_fails_with_the_first_failed_pods_message() -> None:
    resource = training(failurePolicy={"maxRestarts": 1})
    status = with_status(resource, {"restarts": 1, "preemptions": 0})
    cause = "rank 1 failed: FileNotFoundError: [Errno 2] No such file or directory: '/data/missing'"
    pods = [
        worker_pod(1, 0, 1, "rank 0 failed: RuntimeError: Connection reset by peer", "2026-01-01T00:00:09Z"),
        worker_pod(1, 1, 1, cause, "2026-01-01T00:00:05Z"),  # failed first: the cause
        worker_pod(1, 2, 75, "preempted at step 3, checkpoint none", "2026-01-01T00:00:01Z"),  # not a crash
        worker_pod(0, 0, 1, "an older attempt's pod", "2026-01-01T00:00:00Z"),  # another Job's
    ]
    final = training_status.plan(status, [failed_job(resource, 1, "BackoffLimitExceeded")], later(10), pods)
    failed = condition(final.status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "MaxRestartsExceeded")
    assert failed["message"] == (
        f"attempt 1 failed: BackoffLimitExceeded m; pod w-1-1 (exit code 1): {cause}; "
        "failurePolicy.maxRestarts=1 reached"
    )
    restart = training_status.plan(
        with_status(resource, {}), [failed_job(resource, 0, "BackoffLimitExceeded")], T0, [pods[3]]
    )
    assert condition(restart.status, "Restarting")["message"] == (
        "gang restart 1/1 after attempt 0 failed: BackoffLimitExceeded m; "
        "pod w-0-0 (exit code 1): an older attempt's pod"
    )


def test_counters_are_recovered_from_the_newest_jobs_annotation() -> None:
    resource = training()
    status = with_status(resource, {"restarts": 1, "preemptions": 1})  # attempt 2 in status
    later_job = job(resource, 4)
    later_job["metadata"]["annotations"] = {PREEMPTIONS_ANNOTATION: "2"}  # attempt 4 = 2 restarts + 2 preemptions
    decision = training_status.plan(status, [job(resource, 2), later_job], T0)
    assert (decision.attempt, decision.status["restarts"], decision.status["preemptions"]) == (4, 2, 2)
    assert decision.delete_jobs == [job_name(resource, 2)]
    unannotated = training_status.plan(status, [job(resource, 3)], T0)  # an older operator's Job: a restart
    assert (unannotated.status["restarts"], unannotated.status["preemptions"]) == (2, 1)


def test_succeeded_is_terminal_and_ttl_deletes_the_training() -> None:
    resource = training(ttlSecondsAfterFinished=60)
    done = training_status.plan(resource, [job(resource, 0, "Complete")], T0)
    assert condition(done.status, "Succeeded")["status"] == "True" and not done.run_gang
    assert done.delete_jobs == []  # the finished Job stays for inspection
    steady = training_status.plan(with_status(resource, done.status), [job(resource, 0, "Complete")], later(30))
    assert steady.status == done.status and not steady.delete_training
    expired = training_status.plan(with_status(resource, done.status), [], later(61))
    assert expired.delete_training


def test_active_deadline_fails_a_running_training() -> None:
    resource = training(activeDeadlineSeconds=10)
    status = training_status.plan(resource, [], T0).status
    overdue = training_status.plan(with_status(resource, status), [job(resource, 0, ready=2)], later(11))
    assert condition(overdue.status, "Failed")["reason"] == "DeadlineExceeded"
    assert overdue.delete_jobs == [job_name(resource, 0)]


def test_suspend_keeps_progress_and_restarts_and_clears_the_deadline_clock() -> None:
    resource = training(suspend=True)
    previous = {"restarts": 1, "progress": {"step": 7}, "startTime": "2026-01-01T00:00:00Z"}
    decision = training_status.plan(with_status(resource, previous), [job(resource, 1)], later(100))
    assert decision.run_gang and decision.attempt == 1
    assert condition(decision.status, "Suspended")["status"] == "True"
    assert condition(decision.status, "Running")["reason"] == "Suspended"
    assert decision.status["startTime"] is None
    assert "progress" not in decision.status  # rank 0 owns it; the operator never writes it


def test_steady_training_status_is_unchanged() -> None:
    resource = training()
    first = training_status.plan(resource, [job(resource, 0, ready=2)], T0).status
    again = training_status.plan(with_status(resource, first), [job(resource, 0, ready=2)], later(300)).status
    assert not changed(normalized(first), again, training_status.CONDITION_TYPES)


def test_condition_transition_time_moves_only_on_status_change() -> None:
    first = merge([], [Desired("Running", False, "Starting")], 1, T0)
    same = merge(first, [Desired("Running", False, "StillStarting", "new message")], 2, later(5))
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    flipped = merge(same, [Desired("Running", True, "AllWorkersReady")], 2, later(9))
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:00:09Z"
    assert transitions(same, flipped) == flipped
    assert transitions(flipped, flipped) == []


def state(index: int, ready: bool, outdated: bool) -> GroupState:
    return GroupState(index, 2 if ready else 0, ready=ready, outdated=outdated, settled=True)


def test_rollout_restarts_one_ready_group_at_a_time() -> None:
    groups = [state(0, True, True), state(1, True, True), state(2, True, True)]
    assert groups_to_restart(groups, max_unavailable=1) == [0]
    groups = [state(0, False, False), state(1, True, True), state(2, True, True)]
    assert groups_to_restart(groups, max_unavailable=1) == []  # group 0 is still coming back
    groups = [state(0, True, False), state(1, True, True), state(2, True, True)]
    assert groups_to_restart(groups, max_unavailable=2) == [1, 2]


def test_rollout_restarts_outdated_groups_that_are_down_anyway() -> None:
    groups = [state(0, False, True), state(1, True, True)]
    assert groups_to_restart(groups, max_unavailable=1) == [0]


def stateful_set(replicas: int, ready: int, updated: int, generation: int = 2, observed: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": observed, "readyReplicas": ready, "updatedReplicas": updated},
    }


def test_group_state_waits_for_the_controller_to_observe_the_spec() -> None:
    assert group_state(0, stateful_set(2, 2, 0, observed=1), 2).outdated is False
    assert group_state(0, stateful_set(2, 2, 1), 2).outdated is True
    assert group_state(0, stateful_set(2, 2, 2), 2).ready is True


def test_serving_conditions() -> None:
    resource = serving()
    ready = [state(0, True, False), state(1, True, False)]
    status = serving_status(resource, ready, 1, None, T0)
    assert condition(status, "Available")["status"] == "True"
    assert condition(status, "Progressing")["reason"] == "RolloutComplete"
    assert status["endpoint"] == "http://k2-debug-serve.ns1.svc:8000"
    body = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = status
    degraded = serving_status(
        type(resource).model_validate(body), [ready[0], state(1, False, False)], 1, None, later(5)
    )
    assert condition(degraded, "Degraded")["status"] == "True"
    assert condition(degraded, "Available")["status"] == "True"
    suspended = serving_status(serving(suspend=True), [], 0, None, T0)
    assert condition(suspended, "Available")["reason"] == "Suspended"


def placement_body() -> dict[str, Any]:
    body = stored(placement_builder.expert_placement(serving()))
    body["status"] = {}
    return body


def pod(generation: int | None) -> dict[str, Any]:
    annotations = {} if generation is None else {"k2.ai/applied-placement-generation": str(generation)}
    return {"metadata": {"annotations": annotations}, "status": {"phase": "Running"}}


def test_placement_applied_when_every_rank_reports_it() -> None:
    body = placement_body()
    partial = placement_status.plan(body, None, [pod(1), pod(None)], 2, T0)
    assert partial.valid and partial.in_force == 1
    assert condition(partial.status, "Applying")["status"] == "True"
    assert partial.status["appliedRanks"] == 1 and partial.status["appliedGeneration"] is None
    done = placement_status.plan(body, 1, [pod(1), pod(1)], 2, T0)
    assert done.status["appliedGeneration"] == 1
    assert condition(done.status, "Applied")["status"] == "True"


def test_placement_status_lists_each_running_rank_and_the_generation_it_reports() -> None:
    def named(name: str, group: str, generation: int | None, phase: str = "Running") -> dict[str, Any]:
        body = pod(generation)
        body["metadata"].update(name=name, labels={"k2.ai/group": group})
        body["status"]["phase"] = phase
        return body

    ranks = [
        named("s-g1-0", "1", 2),
        named("s-g0-1", "0", None),
        named("s-g0-0", "0", 1),
        named("x", "0", 1, "Pending"),
    ]
    status = placement_status.plan(placement_body(), 1, ranks, 3, T0).status
    assert status["ranks"] == [
        {"pod": "s-g0-0", "group": 0, "generation": 1},
        {"pod": "s-g0-1", "group": 0, "generation": None},
        {"pod": "s-g1-0", "group": 1, "generation": 2},
    ]


def test_invalid_placement_keeps_the_previous_generation_in_force() -> None:
    body = placement_body()
    body["status"] = {"appliedGeneration": 1}
    broken = copy.deepcopy(body)
    broken["spec"]["generation"] = 2
    broken["spec"]["layers"][0]["slots"] = [[0] * len(row) for row in broken["spec"]["layers"][0]["slots"]]
    decision = placement_status.plan(broken, 1, [pod(1), pod(1)], 2, T0)
    assert not decision.valid and decision.in_force == 1
    invalid = condition(decision.status, "Invalid")
    assert invalid["status"] == "True" and "experts without a replica" in invalid["message"]
    assert decision.status["appliedGeneration"] == 1
    assert condition(decision.status, "Applied")["status"] == "True"
