"""What a K2Training reconcile does and the status it writes, from the resource and its observed Jobs.

Attempts: the gang of attempt N is the Job `<name>-worker-N`, N = restarts + preemptions. The attempt in force is the
larger of that sum in status and the highest attempt among the existing Jobs, whose `k2.ai/preemptions` annotation
splits it again (so a crash between creating a Job and writing status converges). A Job of the attempt in force
that failed by its podFailurePolicy was preempted: attempt N+1 starts and only `preemptions` grows. Any other
failure starts attempt N+1 while restarts < maxRestarts, else the training is Failed; the Restarting and Failed
messages carry the failed pod's termination message. Only a Complete Job (every worker reached spec.steps)
is Succeeded. Succeeded and Failed are terminal: no new gang is created and the status stays as it is, until
ttlSecondsAfterFinished deletes the resource.

Checkpoint fallback: when rank 0 reports that its resume skipped unreadable checkpoints
(`status.progress.checkpointFallback`), the CheckpointFallback condition turns True with what was skipped and why,
and its transition posts a Warning event; a later gang that resumes from its newest checkpoint reports null, which
clears it. The condition appears only once a fallback ever happened.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from k2_api import K2Training, TrainingConditionType
from k2_api.contract import ExitCodes, Labels
from k2_operator.builders.training import PREEMPTED_REASON, PREEMPTIONS_ANNOTATION, job_name
from k2_operator.conditions import Condition, Desired, find, is_true, merge, rfc3339
from k2_operator.status.kstatus import KSTATUS_TYPES, State, Summary, kstatus_conditions

T = TrainingConditionType
CONDITION_TYPES = tuple(t.value for t in TrainingConditionType) + KSTATUS_TYPES
MAX_CONDITION_MESSAGE = 32768  # the bound of a condition's message (k2_api.common.Condition, as metav1)
OWNED_FIELDS = ("observedGeneration", "restarts", "preemptions", "readyWorkers", "startTime", "completionTime")


@dataclass
class TrainingPlan:
    attempt: int
    """Attempt whose Job should exist (applied unless `run_gang` is False)."""
    preemptions: int
    """Preemptions before `attempt` (recorded on its Job)."""
    run_gang: bool
    """Apply the children and the Job of `attempt` (False once the training is terminal)."""
    delete_jobs: list[str] = field(default_factory=list)
    broken_jobs: list[str] = field(default_factory=list)
    """Jobs of the attempt that just crashed: their pods still alive are deleted with BROKEN_GANG_GRACE_S, not the
    preemption grace (a gang missing a rank cannot checkpoint). A preempted attempt's pods keep theirs."""
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


def job_preemptions(job: dict[str, Any]) -> int | None:
    try:
        return int(job["metadata"].get("annotations", {})[PREEMPTIONS_ANNOTATION])
    except (KeyError, ValueError):
        return None


def counters(previous: dict[str, Any], jobs: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(restarts, preemptions) in force: status's, unless a Job of a later attempt exists (status not yet written)."""
    restarts, preemptions = int(previous.get("restarts", 0)), int(previous.get("preemptions", 0))
    for job in sorted(jobs, key=job_attempt):
        attempt = job_attempt(job)
        if attempt > restarts + preemptions:
            recorded = job_preemptions(job)
            preemptions = min(attempt, preemptions if recorded is None else recorded)
            restarts = attempt - preemptions
    return restarts, preemptions


def _owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    return uid is not None and any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences", []))


def termination_cause(job: dict[str, Any] | None, pods: Sequence[dict[str, Any]], preempted: bool) -> str:
    """`pod P (exit code C): <termination message>` of the Job's pod that stopped first the way the Job failed
    (a crash, or a preemption when `preempted`); "" when no such pod is left to tell."""
    if job is None:
        return ""
    stopped: list[tuple[str, str, int, str]] = []
    for pod in pods:
        if not _owned_by(pod, job["metadata"].get("uid")):
            continue
        for container in pod.get("status", {}).get("containerStatuses", []):
            terminated = container.get("state", {}).get("terminated") or {}
            code = terminated.get("exitCode")
            if code is None or code == ExitCodes.SUCCEEDED or (code == ExitCodes.PREEMPTED) != preempted:
                continue
            message = str(terminated.get("message") or terminated.get("reason") or "no termination message")
            finished = str(terminated.get("finishedAt") or "9999")  # unknown: after every known time
            stopped.append((finished, pod["metadata"]["name"], int(code), message))
    if not stopped:
        return ""
    _, name, code, message = min(stopped)
    return f"pod {name} (exit code {code}): {message.strip()}"


def _parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def checkpoint_fallback(training: K2Training, old_conditions: Sequence[Condition]) -> Desired | None:
    """The CheckpointFallback condition from rank 0's `status.progress.checkpointFallback`; None while no fallback
    ever happened (the condition is then left out)."""
    progress = training.status.progress if training.status else None
    fallback = progress.checkpoint_fallback if progress is not None else None
    if fallback is None:
        if find(list(old_conditions), T.CHECKPOINT_FALLBACK) is None:
            return None
        return Desired(T.CHECKPOINT_FALLBACK, False, "ResumedFromNewest")
    skipped = "; ".join(f"step {s.step} at {s.path} ({s.reason})" for s in fallback.skipped)
    if fallback.resumed_step is None:
        target = "no readable checkpoint was left: started again from step 0"
    else:
        target = f"resumed from step {fallback.resumed_step} ({fallback.resumed_from})"
    message = f"{target}; skipped {skipped}"[:MAX_CONDITION_MESSAGE]
    return Desired(T.CHECKPOINT_FALLBACK, True, "UnreadableCheckpoint", message)


def summary(conditions: dict[str, Desired]) -> Summary:
    """Where the training stands for kstatus, from its own conditions: Failed stalls it, Succeeded and Running are
    Ready, so is Suspended (nothing to do), anything else is on its way (restarting, or waiting for its workers)."""
    failed, running, restarting = conditions[T.FAILED], conditions[T.RUNNING], conditions[T.RESTARTING]
    if failed.status:
        return Summary(State.STALLED, failed.reason, failed.message)
    if conditions[T.SUCCEEDED].status:
        return Summary(State.READY, "Succeeded", "every worker finished spec.steps")
    if conditions[T.SUSPENDED].status:
        return Summary(State.READY, "Suspended", "spec.suspend is true")
    if running.status:
        return Summary(State.READY, running.reason, running.message)
    if restarting.status:
        return Summary(State.RECONCILING, restarting.reason, restarting.message)
    return Summary(State.RECONCILING, running.reason, running.message)


def plan(
    training: K2Training, jobs: list[dict[str, Any]], now: dt.datetime, pods: Sequence[dict[str, Any]] = ()
) -> TrainingPlan:
    """The reconcile's decisions from the resource, its Jobs and their pods (for termination messages)."""
    spec = training.spec
    previous: dict[str, Any] = training.status.to_dict() if training.status else {}
    old_conditions: list[Condition] = previous.get("conditions", [])
    restarts, preemptions = counters(previous, jobs)
    current = next((j for j in jobs if j["metadata"]["name"] == job_name(training, restarts + preemptions)), None)
    start = _parse_time(previous.get("startTime"))
    completion = _parse_time(previous.get("completionTime"))
    succeeded = is_true(old_conditions, T.SUCCEEDED)
    failed = is_true(old_conditions, T.FAILED)
    failed_reason, failed_message = "", ""
    restart_reason, restart_message = "", ""
    if failed:
        old = find(old_conditions, T.FAILED) or {}
        failed_reason, failed_message = str(old.get("reason", "")), str(old.get("message", ""))
    terminal_before = succeeded or failed
    broken: list[str] = []

    if not terminal_before:
        attempt = restarts + preemptions
        job_failed = _job_condition(current, "Failed") or _job_condition(current, "FailureTarget")
        if _job_condition(current, "Complete") or _job_condition(current, "SuccessCriteriaMet"):
            succeeded = True
        elif job_failed is not None and job_failed.get("reason") == PREEMPTED_REASON:
            cause = termination_cause(current, pods, preempted=True) or str(job_failed.get("message", ""))
            preemptions += 1
            restart_reason = "Preempted"
            restart_message = f"attempt {attempt} preempted ({preemptions} so far, not counted): {cause}".strip()
            current = None
        elif job_failed is not None:
            assert current is not None  # a condition was found on it
            broken.append(current["metadata"]["name"])
            why = f"attempt {attempt} failed: {job_failed.get('reason', '')} {job_failed.get('message', '')}".strip()
            cause = termination_cause(current, pods, preempted=False)
            why = f"{why}; {cause}" if cause else why
            if restarts < spec.failure_policy.max_restarts:
                restarts += 1
                current = None
                restart_reason = "GangRestart"
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
    attempt = restarts + preemptions
    restarting = not terminal and not spec.suspend and attempt > 0 and not running
    if restarting and not restart_message:
        old = find(old_conditions, T.RESTARTING) or {}
        if old.get("status") == "True":
            restart_reason, restart_message = str(old.get("reason", "")), str(old.get("message", ""))
        else:
            restart_reason, restart_message = "GangRestart", f"gang restart {attempt}"

    if terminal:
        running_reason = "Succeeded" if succeeded else "Failed"
    elif spec.suspend:
        running_reason = "Suspended"
    else:
        running_reason = "AllWorkersReady" if running else "WaitingForWorkers"
    desired = [
        Desired(T.CREATED, True, "GangCreated", f"Job {job_name(training, attempt)}"),
        Desired(T.RUNNING, running, running_reason, f"{ready}/{spec.num_nodes} workers ready"),
        Desired(
            T.RESTARTING,
            restarting,
            restart_reason if restarting else "NotRestarting",
            restart_message,
        ),
        Desired(T.SUCCEEDED, succeeded, "AllWorkersSucceeded" if succeeded else "NotFinished"),
        Desired(T.FAILED, failed, failed_reason or "NotFailed", failed_message),
        Desired(T.SUSPENDED, spec.suspend, "Suspended" if spec.suspend else "NotSuspended"),
    ]
    desired += kstatus_conditions(summary({d.type: d for d in desired}))
    fallback = checkpoint_fallback(training, old_conditions)
    if fallback is not None:
        desired.append(fallback)
    status = {
        "observedGeneration": training.metadata.generation,
        "restarts": restarts,
        "preemptions": preemptions,
        "readyWorkers": ready,
        "startTime": rfc3339(start) if start else None,
        "completionTime": rfc3339(completion) if completion else None,
        "conditions": merge(old_conditions, desired, training.metadata.generation, now),
    }
    keep = job_name(training, attempt)
    # Old attempts go; a failed training also stops its gang; a succeeded one keeps its finished Job for inspection.
    delete = [j["metadata"]["name"] for j in jobs if j["metadata"]["name"] != keep or (failed and not succeeded)]
    ttl = spec.ttl_seconds_after_finished
    expired = terminal and ttl is not None and completion is not None and (now - completion).total_seconds() >= ttl
    return TrainingPlan(
        attempt=attempt,
        preemptions=preemptions,
        run_gang=not terminal,
        delete_jobs=delete,
        broken_jobs=broken,
        delete_training=expired,
        status=status,
    )
