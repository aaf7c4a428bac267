"""Gang restarts of a serving group: when a rank of a formed group fails, every rank pod of the group goes, so that
its StatefulSet recreates them together and they rendezvous afresh. Pure: pods and a record in, a plan out.

A group *forms* when the operator sees all its rank pods ready at once; the gang's members (each pod's name, uid
and container restarts) are then recorded in the `k2.ai/gang` annotation of the group's StatefulSet, which survives
an operator restart. A member breaks the gang when
- one of its containers terminated since the group formed (it is terminated now, or its restart count grew: exit 3
  when the group broke, a crash, an OOM kill),
- its pod Failed, is being deleted, or is gone (a pod of the same name with another uid is its replacement).

The operator then deletes every member still alive: they all predate the failure, while a replacement created
since is kept. Their uids stay in the record (`stale`) until the next gang forms, so a reconcile interrupted half
way deletes the rest and one run again mid-restart deletes nothing twice. Until every rank is ready at once, the
group is forming: a rank that fails meanwhile is restarted in place by the kubelet, and nothing is deleted.

Not failures: a rolling update (`roll`), a group scaled to zero (suspend) or to fewer ranks re-form the gang without
counting a restart.

Rate: the first restart runs at once; each further one in a row waits `Backoff.delay_s` after the previous one (10 s,
doubling, capped at 5 min); a gang that served `Backoff.stable_s` (10 min) before it broke starts the count afresh.
While a restart is held back, the plan says until when (`held_until`) and deletes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FIRST_BACKOFF_S = 10.0
"""The second restart in a row waits this long after the first; each further one twice as long as the one before."""
MAX_BACKOFF_S = 300.0
STABLE_S = 600.0
"""A gang that served this long before it broke restarts at once, as if it were its first failure."""


@dataclass(frozen=True)
class Backoff:
    first_s: float = FIRST_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    stable_s: float = STABLE_S

    def delay_s(self, streak: int) -> float:
        """How long after the previous restart the next may run, `streak` restarts in a row so far."""
        return 0.0 if streak <= 0 else min(self.first_s * 2.0 ** (streak - 1), self.max_s)


BACKOFF = Backoff()


def _time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _rfc3339(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Termination:
    """A container's last end, as the kubelet reports it."""

    container: str
    exit_code: int | None
    reason: str | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class RankPod:
    """What the decision reads of a rank pod."""

    name: str
    uid: str
    created: dt.datetime | None
    ready: bool
    restarts: int
    """Container restarts, summed over the pod's containers."""
    deleting: bool
    failed: bool
    """phase Failed (evicted, node shut down): the kubelet will not restart it."""
    failure_reason: str | None = None
    stopped: bool = False
    """A container is terminated now (the kubelet has not restarted it yet)."""
    termination: Termination | None = None
    """The latest container termination (current state or last state), if any."""

    @property
    def up(self) -> bool:
        """Ready, and nothing in it has stopped: it may join a gang."""
        return self.ready and not (self.deleting or self.failed or self.stopped)

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> RankPod:
        meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
        statuses = status.get("containerStatuses", []) or []
        ends = [
            Termination(
                str(s.get("name", "")),
                terminated.get("exitCode"),
                terminated.get("reason"),
                _time(terminated.get("finishedAt")),
            )
            for s in statuses
            for terminated in ((s.get("state") or {}).get("terminated"), (s.get("lastState") or {}).get("terminated"))
            if terminated
        ]
        latest = max(ends, key=lambda t: t.finished_at or dt.datetime.min.replace(tzinfo=dt.UTC), default=None)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []) or [])
        return cls(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            created=_time(meta.get("creationTimestamp")),
            ready=ready,
            restarts=sum(int(s.get("restartCount", 0) or 0) for s in statuses),
            deleting=bool(meta.get("deletionTimestamp")),
            failed=status.get("phase") == "Failed",
            failure_reason=status.get("reason"),
            stopped=any((s.get("state") or {}).get("terminated") for s in statuses),
            termination=latest,
        )


@dataclass(frozen=True)
class Failure:
    """Why a gang broke: which rank pod, and what happened to it."""

    pod: str
    what: str
    exit_code: int | None = None

    def message(self) -> str:
        return f"rank pod {self.pod} {self.what}"


def _exited(termination: Termination | None) -> tuple[str, int | None]:
    if termination is None:
        return "restarted", None
    code, reason = termination.exit_code, termination.reason
    detail = f" ({reason})" if reason else ""
    return (f"exited with code {code}{detail}" if code is not None else f"terminated{detail}"), code


@dataclass(frozen=True)
class Member:
    """A rank pod of a formed gang: which pod it was (a replacement of the same name has another uid) and how many
    times its containers had restarted when the gang formed."""

    uid: str
    restarts: int


@dataclass(frozen=True)
class GangRecord:
    """What the operator remembers of a group between reconciles (the StatefulSet's `k2.ai/gang` annotation)."""

    members: Mapping[str, Member] = field(default_factory=dict)
    """The formed gang by pod name. Empty while the group forms."""
    formed_at: dt.datetime | None = None
    stale: frozenset[str] = frozenset()
    """Uids of the last broken (or rolled) gang's pods: deleted wherever they are still alive."""
    restarts: int = 0
    """Gang restarts after a failure, in all."""
    streak: int = 0
    """Gang restarts in a row (the backoff's exponent)."""
    restarted_at: dt.datetime | None = None
    reason: str | None = None
    """Why the last gang restart happened."""
    recovering: bool = False
    """Re-forming after a failure: the group is restarting, not serving."""

    def is_empty(self) -> bool:
        return self == GangRecord()

    def to_annotation(self) -> str:
        body = {
            "members": {name: {"uid": m.uid, "restarts": m.restarts} for name, m in sorted(self.members.items())},
            "formedAt": _rfc3339(self.formed_at),
            "stale": sorted(self.stale),
            "restarts": self.restarts,
            "streak": self.streak,
            "restartedAt": _rfc3339(self.restarted_at),
            "reason": self.reason,
            "recovering": self.recovering,
        }
        return json.dumps({k: v for k, v in body.items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> GangRecord:
        """The record in `text`; an absent or unreadable one (a hand edit) is an empty record: the group re-forms."""
        if not text:
            return cls()
        try:
            body = json.loads(text)
            return cls(
                members={
                    str(name): Member(str(m["uid"]), int(m["restarts"]))
                    for name, m in dict(body.get("members", {})).items()
                },
                formed_at=_time(body.get("formedAt")),
                stale=frozenset(str(uid) for uid in body.get("stale", [])),
                restarts=int(body.get("restarts", 0)),
                streak=int(body.get("streak", 0)),
                restarted_at=_time(body.get("restartedAt")),
                reason=body.get("reason"),
                recovering=bool(body.get("recovering", False)),
            )
        except (ValueError, TypeError, AttributeError, KeyError):
            return cls()


@dataclass(frozen=True)
class GangPlan:
    """What to do with one group now."""

    record: GangRecord
    """The record to write (before deleting anything, so that an interrupted restart resumes)."""
    delete: tuple[str, ...] = ()
    """Names of the rank pods to delete now."""
    failure: Failure | None = None
    """The failure that breaks the gang, restarted now or held back."""
    held_until: dt.datetime | None = None
    """Set while the backoff holds the restart back: when it may run (reconcile again then)."""

    @property
    def restarting_now(self) -> bool:
        return self.failure is not None and self.held_until is None

    @property
    def restarting(self) -> bool:
        """The group is not serving as a gang: a rank failed (restart now or held back) or it is re-forming."""
        return self.failure is not None or self.record.recovering


def broken(record: GangRecord, pods: Iterable[RankPod]) -> Failure | None:
    """The first member (by pod name) that failed since the gang formed, if any."""
    pods = list(pods)
    by_uid, names = {p.uid: p for p in pods}, {p.name for p in pods}
    for name, member in sorted(record.members.items()):
        pod = by_uid.get(member.uid)
        if pod is None:
            return Failure(name, "was deleted and recreated" if name in names else "is gone")
        if pod.deleting:
            return Failure(name, "is being deleted")
        if pod.failed:
            return Failure(name, f"failed ({pod.failure_reason or 'phase Failed'})")
        if pod.stopped or pod.restarts > member.restarts:
            what, code = _exited(pod.termination)
            return Failure(name, what, code)
    return None


def _ordinal(pod_name: str) -> int:
    """A StatefulSet pod's ordinal: the number its name ends with."""
    tail = pod_name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def plan(
    record: GangRecord,
    pods: Iterable[RankPod],
    ranks: int,
    now: dt.datetime,
    backoff: Backoff = BACKOFF,
) -> GangPlan:
    """The plan for one group of `ranks` ranks (0: scaled to zero or suspended) whose rank pods are `pods` (this
    group's only). Idempotent: planning again on the same pods with the returned record deletes nothing twice."""
    pods = list(pods)
    if ranks == 0:  # stopped on purpose: no gang to keep, and the StatefulSet removes the pods itself
        return GangPlan(dataclasses.replace(record, members={}, formed_at=None, stale=frozenset(), recovering=False))
    live = [p for p in pods if not p.deleting]
    resume = tuple(sorted(p.name for p in live if p.uid in record.stale))
    if not record.members:
        gang = [p for p in live if p.uid not in record.stale]
        if not resume and len(gang) == ranks and all(p.up for p in gang):
            formed = GangRecord(
                members={p.name: Member(p.uid, p.restarts) for p in gang},
                formed_at=now,
                restarts=record.restarts,
                streak=record.streak,
                restarted_at=record.restarted_at,
                reason=record.reason,
            )
            return GangPlan(formed)
        return GangPlan(record, resume)
    if any(_ordinal(name) >= ranks for name in record.members):
        # Fewer ranks (spec.ranksPerGroup): the StatefulSet removes the highest ones, and the rest cannot serve at
        # the old world size. The gang re-forms at its new size, as in a rolling update: no failure is counted.
        return roll(GangPlan(record, resume), pods, ())
    failure = broken(record, pods)
    if failure is None:
        return GangPlan(record, resume)
    stable = record.formed_at is not None and (now - record.formed_at).total_seconds() >= backoff.stable_s
    streak = 0 if stable else record.streak
    if record.restarted_at is not None and streak > 0:
        due = record.restarted_at + dt.timedelta(seconds=backoff.delay_s(streak))
        if now < due:
            return GangPlan(record, resume, failure, held_until=due)
    restarted = GangRecord(
        stale=record.stale | {m.uid for m in record.members.values()},
        restarts=record.restarts + 1,
        streak=streak + 1,
        restarted_at=now,
        reason=failure.message(),
        recovering=True,
    )
    doomed = sorted({p.name for p in live if p.uid in restarted.stale})
    return GangPlan(restarted, tuple(doomed), failure)


def roll(current: GangPlan, pods: Iterable[RankPod], outdated: Iterable[str]) -> GangPlan:
    """`current` plus a restart the operator chose (a rolling update deleting the `outdated` pods): the gang and
    those pods go, and nothing counts against the backoff."""
    pods, names = list(pods), set(outdated)
    uids = {p.uid for p in pods if p.name in names}
    record = dataclasses.replace(
        current.record,
        members={},
        formed_at=None,
        stale=current.record.stale | {m.uid for m in current.record.members.values()} | uids,
    )
    live = {p.name for p in pods if not p.deleting and p.uid in record.stale}
    return dataclasses.replace(current, record=record, delete=tuple(sorted(set(current.delete) | live)))
