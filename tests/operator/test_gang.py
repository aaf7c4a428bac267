"""The gang-restart decision of a serving group (`k2_operator.gang`), as pure functions: formation, each kind of rank
failure, the backoff, idempotence, and (with hypothesis) that it deletes only the broken gang's own pods."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from k2_operator.gang import (
    BACKOFF,
    GangPlan,
    GangRecord,
    Member,
    RankPod,
    plan,
    roll,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
RANKS = 2


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def pod(
    rank: int,
    uid: str | None = None,
    ready: bool = True,
    restarts: int = 0,
    exit_code: int | None = None,
    reason: str = "Error",
    deleting: bool = False,
    phase: str = "Running",
    group: int = 0,
) -> dict[str, Any]:
    """A rank pod as the API server returns it (only the fields the decision reads)."""
    name = f"s-g{group}-{rank}"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "rank", "restartCount": restarts, "state": {"running": {}}}],
    }
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": "2026-01-01T00:00:30Z"}
        status["containerStatuses"][0]["lastState"] = {"terminated": terminated}
    meta: dict[str, Any] = {"name": name, "uid": uid or f"{name}-a", "creationTimestamp": "2026-01-01T00:00:00Z"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {"metadata": meta, "status": status}


def ranks(*pods: dict[str, Any]) -> list[RankPod]:
    return [RankPod.from_pod(p) for p in pods]


def formed(at_s: float = 0.0, **fields: Any) -> GangRecord:
    """The record of group 0 formed from pods s-g0-0 and s-g0-1 (first uids)."""
    members = {f"s-g0-{r}": Member(f"s-g0-{r}-a", 0) for r in range(RANKS)}
    return GangRecord(members=members, formed_at=at(at_s), **fields)


def test_a_group_forms_when_every_rank_is_ready_at_once() -> None:
    forming = plan(GangRecord(), ranks(pod(0), pod(1, ready=False)), RANKS, at(5))
    assert forming == GangPlan(GangRecord())
    assert not forming.restarting
    whole = plan(GangRecord(), ranks(pod(0), pod(1)), RANKS, at(6))
    assert whole.record == formed(6)
    assert whole.delete == () and whole.failure is None
    assert plan(GangRecord(), ranks(pod(0)), RANKS, at(6)).record == GangRecord()  # one rank missing
    failed = plan(GangRecord(), ranks(pod(0), pod(1, phase="Failed")), RANKS, at(6))
    assert failed.record == GangRecord()  # a Failed pod (its StatefulSet replaces it) is no member


def test_a_rank_that_exited_restarts_every_rank_pod_of_its_group() -> None:
    result = plan(formed(), ranks(pod(0), pod(1, restarts=1, exit_code=3)), RANKS, at(60))
    assert result.delete == ("s-g0-0", "s-g0-1")
    assert result.failure is not None and result.failure.exit_code == 3
    assert result.failure.message() == "rank pod s-g0-1 exited with code 3 (Error)"
    assert result.restarting_now and result.restarting
    record = result.record
    assert (record.restarts, record.streak, record.restarted_at, record.recovering) == (1, 1, at(60), True)
    assert record.members == {} and record.stale == {"s-g0-0-a", "s-g0-1-a"}
    assert record.reason == "rank pod s-g0-1 exited with code 3 (Error)"


def test_a_rank_whose_container_is_terminated_breaks_the_gang_before_the_kubelet_restarts_it() -> None:
    stopped = pod(1)
    container = stopped["status"]["containerStatuses"][0]
    container["state"] = {"terminated": {"exitCode": 3, "reason": "Error", "finishedAt": "2026-01-01T00:00:40Z"}}
    result = plan(formed(), ranks(pod(0), stopped), RANKS, at(60))
    assert result.delete == ("s-g0-0", "s-g0-1")
    assert result.failure is not None and result.failure.message() == "rank pod s-g0-1 exited with code 3 (Error)"


def test_an_oom_kill_is_named_in_the_failure() -> None:
    result = plan(formed(), ranks(pod(0, restarts=1, exit_code=137, reason="OOMKilled"), pod(1)), RANKS, at(60))
    assert result.failure is not None
    assert result.failure.message() == "rank pod s-g0-0 exited with code 137 (OOMKilled)"


def test_a_deleted_rank_takes_its_peers_and_its_replacement_is_kept() -> None:
    being_deleted = plan(formed(), ranks(pod(0), pod(1, deleting=True)), RANKS, at(60))
    assert being_deleted.delete == ("s-g0-0",)  # the one being deleted is not deleted twice
    assert being_deleted.failure is not None and being_deleted.failure.what == "is being deleted"
    replaced = plan(formed(), ranks(pod(0), pod(1, uid="s-g0-1-b", ready=False)), RANKS, at(60))
    assert replaced.delete == ("s-g0-0",)  # the replacement came after the failure
    assert replaced.failure is not None and replaced.failure.what == "was deleted and recreated"
    gone = plan(formed(), ranks(pod(0)), RANKS, at(60))
    assert gone.delete == ("s-g0-0",) and gone.failure is not None and gone.failure.what == "is gone"


def test_an_evicted_rank_breaks_the_gang() -> None:
    evicted = pod(1, phase="Failed")
    evicted["status"]["reason"] = "Evicted"
    result = plan(formed(), ranks(pod(0), evicted), RANKS, at(60))
    assert result.delete == ("s-g0-0", "s-g0-1")
    assert result.failure is not None and result.failure.what == "failed (Evicted)"


def test_a_steady_gang_is_left_alone() -> None:
    steady = plan(formed(), ranks(pod(0), pod(1)), RANKS, at(3600))
    assert steady == GangPlan(formed())
    not_ready = plan(formed(), ranks(pod(0), pod(1, ready=False)), RANKS, at(3600))  # a slow probe is no failure
    assert not_ready == GangPlan(formed())


def test_a_restart_is_idempotent_and_resumes_when_interrupted() -> None:
    first = plan(formed(), ranks(pod(0), pod(1, restarts=1, exit_code=3)), RANKS, at(60))
    # Interrupted before any delete: the same pods go, and no second restart is counted.
    again = plan(first.record, ranks(pod(0), pod(1, restarts=1, exit_code=3)), RANKS, at(61))
    assert again.delete == first.delete and again.record == first.record and again.failure is None
    # The deletes landed: nothing more to delete while the old pods terminate and the new ones start.
    terminating = ranks(pod(0, deleting=True), pod(1, restarts=1, exit_code=3, deleting=True))
    assert plan(first.record, terminating, RANKS, at(62)) == GangPlan(first.record)
    fresh = ranks(pod(0, uid="s-g0-0-b", ready=False), pod(1, uid="s-g0-1-b", ready=False))
    assert plan(first.record, fresh, RANKS, at(70)) == GangPlan(first.record)
    assert plan(first.record, fresh, RANKS, at(70)).restarting  # re-forming after a failure: not ready
    # The new gang forms: the record keeps the restart count and drops the old uids.
    ready = ranks(pod(0, uid="s-g0-0-b"), pod(1, uid="s-g0-1-b"))
    reformed = plan(first.record, ready, RANKS, at(90)).record
    assert reformed.members == {"s-g0-0": Member("s-g0-0-b", 0), "s-g0-1": Member("s-g0-1-b", 0)}
    assert (reformed.restarts, reformed.streak, reformed.stale, reformed.recovering) == (1, 1, frozenset(), False)


def test_a_gang_forms_only_once_the_old_pods_are_gone() -> None:
    record = GangRecord(stale=frozenset({"s-g0-0-a"}), restarts=1, streak=1, restarted_at=T0, recovering=True)
    result = plan(record, ranks(pod(0), pod(1, uid="s-g0-1-b")), RANKS, at(5))
    assert result.delete == ("s-g0-0",) and result.record == record


def failing(record: GangRecord) -> list[RankPod]:
    """Group 0's current gang (the record's members) with rank 1 exited with 3."""
    first, second = record.members["s-g0-0"], record.members["s-g0-1"]
    return ranks(pod(0, uid=first.uid), pod(1, uid=second.uid, restarts=second.restarts + 1, exit_code=3))


def reform(record: GangRecord, at_s: float, generation: str) -> GangRecord:
    new = ranks(pod(0, uid=f"s-g0-0-{generation}"), pod(1, uid=f"s-g0-1-{generation}"))
    result = plan(record, new, RANKS, at(at_s))
    assert result.record.members, "the new gang formed"
    return result.record


def test_restarts_in_a_row_back_off_exponentially_up_to_the_cap() -> None:
    assert [BACKOFF.delay_s(n) for n in range(7)] == [0, 10, 20, 40, 80, 160, 300]
    first = plan(formed(), failing(formed()), RANKS, at(60))
    assert first.restarting_now  # the first restart runs at once
    record = reform(first.record, 65, "b")
    held = plan(record, failing(record), RANKS, at(66))
    assert held.held_until == at(70) and held.delete == () and held.failure is not None
    assert held.record == record and held.restarting and not held.restarting_now
    second = plan(record, failing(record), RANKS, at(70))
    assert second.restarting_now and second.record.streak == 2
    record = reform(second.record, 75, "c")
    assert plan(record, failing(record), RANKS, at(80)).held_until == at(90)  # 20 s after the second restart


def test_the_backoff_never_waits_longer_than_the_cap() -> None:
    record = dataclasses.replace(formed(0), streak=30, restarts=30, restarted_at=T0)
    assert plan(record, failing(record), RANKS, at(1)).held_until == at(BACKOFF.max_s)


def test_a_gang_stable_for_ten_minutes_restarts_at_once_again() -> None:
    record = dataclasses.replace(formed(100), streak=5, restarts=5, restarted_at=at(90))
    before = plan(record, failing(record), RANKS, at(100 + BACKOFF.stable_s - 1))
    assert before.held_until is None  # 160 s after the last restart passed already
    record = dataclasses.replace(formed(100), streak=8, restarts=8, restarted_at=at(90))
    assert plan(record, failing(record), RANKS, at(200)).held_until == at(390)  # capped at 300 s
    after = plan(record, failing(record), RANKS, at(100 + BACKOFF.stable_s))
    assert after.restarting_now and after.record.streak == 1 and after.record.restarts == 9


def test_a_stopped_group_keeps_no_gang_and_deletes_nothing() -> None:
    record = dataclasses.replace(formed(), restarts=2, streak=1, restarted_at=T0, reason="r")
    stopped = plan(record, ranks(pod(0, deleting=True), pod(1, deleting=True)), 0, at(60))
    assert stopped.delete == () and stopped.failure is None
    assert stopped.record.members == {} and stopped.record.restarts == 2 and not stopped.restarting


def test_a_rolling_update_restarts_the_gang_without_counting_a_failure() -> None:
    pods = ranks(pod(0), pod(1))
    steady = plan(formed(), pods, RANKS, at(60))
    rolled = roll(steady, pods, ["s-g0-0", "s-g0-1"])
    assert rolled.delete == ("s-g0-0", "s-g0-1") and rolled.failure is None and not rolled.restarting
    assert rolled.record.members == {} and rolled.record.restarts == 0
    assert rolled.record.stale == {"s-g0-0-a", "s-g0-1-a"}
    # The new pods come up: no failure is seen in the old gang's departure.
    assert plan(rolled.record, ranks(pod(0, deleting=True), pod(1, deleting=True)), RANKS, at(61)).delete == ()


def test_fewer_ranks_per_group_re_form_the_gang_without_a_failure() -> None:
    members = {f"s-g0-{r}": Member(f"s-g0-{r}-a", 0) for r in range(4)}
    four = GangRecord(members=members, formed_at=T0)
    pods = ranks(pod(0), pod(1), pod(2, deleting=True), pod(3, deleting=True))  # the StatefulSet scaled down
    resized = plan(four, pods, 2, at(60))
    assert resized.delete == ("s-g0-0", "s-g0-1") and resized.failure is None and not resized.restarting
    assert resized.record.members == {} and resized.record.restarts == 0
    grown = plan(formed(), ranks(pod(0), pod(1), pod(2, ready=False), pod(3, ready=False)), 4, at(60))
    assert grown == GangPlan(formed())  # more ranks: the old gang serves until the rolling update replaces it


def test_the_record_survives_its_annotation_and_a_garbled_one_is_empty() -> None:
    record = dataclasses.replace(
        formed(7), stale=frozenset({"x"}), restarts=3, streak=2, restarted_at=at(5), reason="rank pod p is gone"
    )
    assert GangRecord.from_annotation(record.to_annotation()) == record
    assert GangRecord.from_annotation(GangRecord().to_annotation()) == GangRecord()
    for garbled in (None, "", "{", "[]", '{"members": {"p": 3}}', '{"restarts": "many"}'):
        assert GangRecord.from_annotation(garbled) == GangRecord()


# --- properties ---------------------------------------------------------------------------------------------------

Event = tuple[str, int]
"""(what happens, to which rank)."""

events = st.lists(
    st.tuples(st.sampled_from(["stop", "exit", "delete", "recreate", "ready", "unready", "evict"]), st.integers(0, 2)),
    max_size=12,
)


class World:
    """One group's pods between two reconciles: the kubelet restarts containers, users delete pods, the StatefulSet
    replaces deleted pods (with new uids)."""

    def __init__(self, size: int) -> None:
        self.size, self.serial = size, 0
        self.pods: dict[str, dict[str, Any]] = {}
        for rank in range(size):
            self.create(rank)

    def create(self, rank: int) -> None:
        self.serial += 1
        self.pods[f"s-g0-{rank}"] = pod(rank, uid=f"uid-{self.serial}", ready=False)

    def act(self, what: str, rank: int) -> None:
        rank %= self.size
        current = self.pods[f"s-g0-{rank}"]
        status = current["status"]
        if what == "stop":  # terminated, not restarted yet
            status["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 3, "reason": "Error"}}
            status["conditions"] = [{"type": "Ready", "status": "False"}]
        elif what == "exit":
            container = status["containerStatuses"][0]
            container["restartCount"] += 1
            container["lastState"] = {"terminated": {"exitCode": 3, "reason": "Error"}}
        elif what == "delete":
            current["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
        elif what == "recreate":  # deleted and replaced while nobody looked
            self.create(rank)
        elif what == "evict":
            status["phase"] = "Failed"
        else:
            status["conditions"] = [{"type": "Ready", "status": "True" if what == "ready" else "False"}]

    def delete(self, names: tuple[str, ...]) -> None:
        for name in names:
            assert not self.pods[name]["metadata"].get("deletionTimestamp"), f"{name} deleted twice"
            self.pods[name]["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"

    def settle(self) -> None:
        """Terminating and failed pods are replaced, stopped containers restarted, and every pod turns ready."""
        for rank in range(self.size):
            current = self.pods[f"s-g0-{rank}"]
            if current["metadata"].get("deletionTimestamp") or current["status"]["phase"] == "Failed":
                self.create(rank)
        for current in self.pods.values():
            container = current["status"]["containerStatuses"][0]
            if "terminated" in container["state"]:
                container["lastState"], container["state"] = container["state"], {"running": {}}
                container["restartCount"] += 1
            current["status"]["conditions"] = [{"type": "Ready", "status": "True"}]

    def ranks(self) -> list[RankPod]:
        return ranks(*self.pods.values())


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 3), history=events, stable=st.booleans())
def test_the_plan_deletes_only_the_broken_gang_once_and_never_loops(
    size: int, history: list[Event], stable: bool
) -> None:
    world = World(size)
    world.settle()
    record = plan(GangRecord(), world.ranks(), size, T0).record
    assert set(record.members) == set(world.pods)
    clock = 0.0
    for what, rank in history:
        clock += BACKOFF.stable_s if stable else 1.0
        old_gangs = {m.uid for m in record.members.values()} | record.stale
        world.act(what, rank)
        result = plan(record, world.ranks(), size, at(clock))
        for name in result.delete:
            # A pod of the gang that formed before the failure (or of one whose restart is under way): never a pod
            # created after the failure, and never one already going (World.delete checks that).
            assert world.pods[name]["metadata"]["uid"] in old_gangs, f"{name} is not of a broken gang"
        assert result.record.restarts - record.restarts == (1 if result.restarting_now else 0)
        world.delete(result.delete)
        again = plan(result.record, world.ranks(), size, at(clock))
        assert again.delete == () and not again.restarting_now, "planning again deletes or restarts nothing"
        # It may go one step on (a gang whose restart deleted nothing forms at once), then it stays put.
        assert plan(again.record, world.ranks(), size, at(clock)) == dataclasses.replace(again, delete=())
        record = again.record
    # Whatever happened, the group re-forms once its pods are replaced and ready, and then stays put.
    for _ in range(3):
        clock += BACKOFF.max_s + 1
        result = plan(record, world.ranks(), size, at(clock))
        world.delete(result.delete)
        record = result.record
        world.settle()
    final = plan(record, world.ranks(), size, at(clock + 1))
    assert final.record.members and final.delete == () and final.failure is None
    assert plan(final.record, world.ranks(), size, at(clock + 2)) == GangPlan(final.record)


@settings(max_examples=100, deadline=None)
@given(failures=st.integers(1, 8), spacing_s=st.sampled_from([0.5, 5.0, 30.0, 700.0]))
def test_restarts_are_never_closer_than_the_backoff(failures: int, spacing_s: float) -> None:
    record = formed()
    restarts: list[tuple[float, int]] = []
    clock = 0.0
    for generation in range(failures):
        clock += spacing_s
        result = plan(record, failing(record), RANKS, at(clock))
        if result.held_until is not None:
            assert result.delete == ()
            clock = (result.held_until - T0).total_seconds()
            result = plan(record, failing(record), RANKS, at(clock))
        assert result.restarting_now
        restarts.append((clock, result.record.streak))
        clock += spacing_s
        record = reform(result.record, clock, f"n{generation}")
    for (before, _), (after, streak) in itertools.pairwise(restarts):
        assert after - before >= BACKOFF.delay_s(streak - 1)
