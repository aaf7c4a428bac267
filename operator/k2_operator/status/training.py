"""What a K2Training reconcile does and the status it writes, from the resource and its observed Jobs.

Attempts: the gang of attempt N is the Job `<name>-worker-N`; the attempt in force is the larger of status.restarts
and the highest attempt among the existing Jobs (so a crash between creating a Job and writing status converges).
A failed Job of the attempt in force starts attempt N+1 while N < maxRestarts, else the training is Failed.
Succeeded and Failed are terminal: no new gang is created and the status stays as it is, until
ttlSecondsAfterFinished deletes the resource.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from k2_api import K2Training, TrainingConditionType
from k2_api.contract import Labels
from k2_operator.builders.training import job_name
from k2_operator.conditions import Condition, Desired, find, is_true, merge, rfc3339

T = TrainingConditionType
CONDITION_TYPES = tuple(t.value for t in TrainingConditionType)
OWNED_FIELDS = ("observedGeneration", "restarts", "readyWorkers", "startTime", "completionTime")


@dataclass
class TrainingPlan:
    attempt: int
    """Attempt whose Job should exist (applied unless `run_gang` is False)."""
    run_gang: bool
    """Apply the children and the Job of `attempt` (False once the training is terminal)."""
    delete_jobs: list[str] = field(default_factory=list)
    delete_training: bool = False
    status: dict[str, Any] = field(default_factory=dict)


def _job_condition(job: dict[str, Any] | None, condition_type: str) -> Condition | None:
    if job is None:
        return None
    found = find(job.get("status", {}).get("conditions", []), condition_type)
    return found if found is not None and found.get("status") == "True" else None


def job_attempt(job: dict[str, Any]) -> int:
    try:
        return int(job["metadata"].get("labels", {}).get(Labels.ATTEMPT, "0"))
    except ValueError:
        return 0


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def plan(training: K2Training, jobs: list[dict[str, Any]], now: dt.datetime) -> TrainingPlan:
    spec = training.spec
    previous: dict[str, Any] = training.status.to_dict() if training.status else {}
    old_conditions: list[Condition] = previous.get("conditions", [])
    restarts = max([int(previous.get("restarts", 0)), *(job_attempt(j) for j in jobs)])
    current = next((j for j in jobs if j["metadata"]["name"] == job_name(training, restarts)), None)
    start = _parse_time(previous.get("startTime"))
    completion = _parse_time(previous.get("completionTime"))
    succeeded = is_true(old_conditions, T.SUCCEEDED)
    failed = is_true(old_conditions, T.FAILED)
    failed_reason, failed_message = "", ""
    restart_message = ""
    if failed:
        old = find(old_conditions, T.FAILED) or {}
        failed_reason, failed_message = str(old.get("reason", "")), str(old.get("message", ""))
    terminal_before = succeeded or failed

    if not terminal_before:
        job_failed = _job_condition(current, "Failed") or _job_condition(current, "FailureTarget")
        if _job_condition(current, "Complete") or _job_condition(current, "SuccessCriteriaMet"):
            succeeded = True
        elif job_failed is not None:
            why = f"attempt {restarts} failed: {job_failed.get('reason', '')} {job_failed.get('message', '')}".strip()
            if restarts < spec.failure_policy.max_restarts:
                restarts += 1
                current = None
                restart_message = f"gang restart {restarts}/{spec.failure_policy.max_restarts} after {why}"
            else:
                failed = True
                failed_reason = "MaxRestartsExceeded"
                failed_message = f"{why}; failurePolicy.maxRestarts={spec.failure_policy.max_restarts} reached"
        if spec.suspend:
            start = None  # as Jobs do: activeDeadlineSeconds counts from the last resume
        elif start is None:
            start = now
        deadline = spec.active_deadline_seconds
        overdue = deadline is not None and start is not None and (now - start).total_seconds() > deadline
        if overdue and not (succeeded or failed):
            failed = True
            failed_reason = "DeadlineExceeded"
            failed_message = f"running longer than activeDeadlineSeconds={deadline}"
        if succeeded or failed:
            completion = now

    terminal = succeeded or failed
    ready = int((current or {}).get("status", {}).get("ready", 0) or 0) if not spec.suspend else 0
    running = not terminal and not spec.suspend and current is not None and ready >= spec.num_nodes
    restarting = not terminal and not spec.suspend and restarts > 0 and not running
    if restarting and not restart_message:
        old = find(old_conditions, T.RESTARTING) or {}
        restart_message = str(old.get("message", "")) if old.get("status") == "True" else f"gang restart {restarts}"

    if terminal:
        running_reason = "Succeeded" if succeeded else "Failed"
    elif spec.suspend:
        running_reason = "Suspended"
    else:
        running_reason = "AllWorkersReady" if running else "WaitingForWorkers"
    desired = [
        Desired(T.CREATED, True, "GangCreated", f"Job {job_name(training, restarts)}"),
        Desired(T.RUNNING, running, running_reason, f"{ready}/{spec.num_nodes} workers ready"),
        Desired(T.RESTARTING, restarting, "GangRestart" if restarting else "NotRestarting", restart_message),
        Desired(T.SUCCEEDED, succeeded, "AllWorkersSucceeded" if succeeded else "NotFinished"),
        Desired(T.FAILED, failed, failed_reason or "NotFailed", failed_message),
        Desired(T.SUSPENDED, spec.suspend, "Suspended" if spec.suspend else "NotSuspended"),
    ]
    status = {
        "observedGeneration": training.metadata.generation,
        "restarts": restarts,
        "readyWorkers": ready,
        "startTime": rfc3339(start) if start else None,
        "completionTime": rfc3339(completion) if completion else None,
        "conditions": merge(old_conditions, desired, training.metadata.generation, now),
    }
    keep = job_name(training, restarts)
    # Old attempts go; a failed training also stops its gang; a succeeded one keeps its finished Job for inspection.
    delete = [j["metadata"]["name"] for j in jobs if j["metadata"]["name"] != keep or (failed and not succeeded)]
    ttl = spec.ttl_seconds_after_finished
    expired = terminal and ttl is not None and completion is not None and (now - completion).total_seconds() >= ttl
    return TrainingPlan(
        attempt=restarts, run_gang=not terminal, delete_jobs=delete, delete_training=expired, status=status
    )
