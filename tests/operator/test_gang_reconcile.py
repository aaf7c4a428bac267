"""Gang restarts through the K2Serving reconcile on the fake API server: a rank that exits with 3 (or whose pod is
deleted) takes its group's other rank pods with it, an Event and status say so, the backoff holds the next restart
back and requeues, the other group is never touched, and rolling updates or suspend are not failures."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from k2_api import K2Serving
from k2_api.contract import Annotations, Labels
from k2_api.kube import errors
from k2_operator import requeue
from k2_operator import serving as serving_module
from k2_operator.gang import GangRecord
from k2_operator.requeue import Requeues
from k2_operator.serving import GROUP_RESTART, REVISION_LABEL, reconcile
from tests.operator.fake_env import NS, Env, condition

FILE = "k2serving-debug.yaml"  # 2 groups of 2 ranks
NAME = "k2-debug-serve"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
KUBELET = "kubelet"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class RecordedRequeues:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dt.datetime]] = []

    def at(self, kind: str, namespace: str, name: str, when: dt.datetime) -> None:
        assert kind == K2Serving.KIND
        self.calls.append((namespace, name, when))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(serving_module, "now", clock)
    return clock


@pytest.fixture
def requeues(monkeypatch: pytest.MonkeyPatch) -> RecordedRequeues:
    recorded = RecordedRequeues()
    monkeypatch.setattr(requeue, "REQUEUES", recorded)
    return recorded


def pod_name(group: int, rank: int) -> str:
    return f"{NAME}-g{group}-{rank}"


def start_rank(env: Env, group: int, rank: int, revision: str = "rev-1") -> None:
    """A rank pod as the group's StatefulSet creates it, then ready (as its kubelet reports it)."""
    labels = {
        "app.kubernetes.io/instance": NAME,
        "app.kubernetes.io/component": "rank",
        Labels.KIND: K2Serving.KIND,
        Labels.GROUP: str(group),
        REVISION_LABEL: revision,
    }
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name(group, rank), "namespace": NS, "labels": labels},
        "spec": {"containers": [{"name": "rank", "image": "i"}]},
    }
    assert env.user.create(body) is not None
    report(env, group, rank, ready=True)


def report(env: Env, group: int, rank: int, ready: bool, restarts: int = 0, exit_code: int | None = None) -> None:
    container: dict[str, Any] = {"name": "rank", "ready": ready, "restartCount": restarts, "state": {"running": {}}}
    if exit_code is not None:
        finished = {"exitCode": exit_code, "reason": "Error", "finishedAt": "2026-01-01T00:00:30Z"}
        container["lastState"] = {"terminated": finished}
    status = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [container],
    }
    env.set_status("Pod", pod_name(group, rank), status, manager=KUBELET)


def report_group(env: Env, group: int, ready: int, revision: str = "rev-1") -> None:
    """The group's StatefulSet status, as the StatefulSet controller reports it."""
    stateful_set = env.get("StatefulSet", f"{NAME}-g{group}")
    status = {
        "observedGeneration": stateful_set["metadata"]["generation"],
        "replicas": 2,
        "readyReplicas": ready,
        "updatedReplicas": 2,
        "currentRevision": revision,
        "updateRevision": revision,
    }
    env.set_status("StatefulSet", f"{NAME}-g{group}", status)


def serving_up(env: Env) -> None:
    """Both groups running and ready, their gangs formed."""
    env.create_example(FILE)
    env.run(reconcile, NAME)
    for group in (0, 1):
        for rank in (0, 1):
            start_rank(env, group, rank)
        report_group(env, group, ready=2)
    env.run(reconcile, NAME)
    for group in (0, 1):
        assert record(env, group).members, f"group {group} formed"


def record(env: Env, group: int) -> GangRecord:
    annotations = env.get("StatefulSet", f"{NAME}-g{group}")["metadata"].get("annotations", {})
    return GangRecord.from_annotation(annotations.get(Annotations.GANG))


def group_status(env: Env, group: int) -> dict[str, Any]:
    statuses = env.get(K2Serving.KIND, NAME)["status"]["groupStatuses"]
    found = [s for s in statuses if s["group"] == group]
    assert len(found) == 1
    return dict(found[0])


def deleted_pods(env: Env) -> list[str]:
    return [c.name for c in env.cluster.writes("delete", "Pod")]


def restart_events(env: Env) -> list[dict[str, Any]]:
    return [e for e in env.user.list("Event", NS) if e["reason"] == GROUP_RESTART]


def recreate_group(env: Env, group: int, ready: bool = True) -> None:
    """The StatefulSet recreates the group's deleted pods (new uids)."""
    for rank in (0, 1):
        if env.user.get("Pod", NS, pod_name(group, rank)) is None:
            start_rank(env, group, rank)
            report(env, group, rank, ready=ready)


def test_a_rank_that_exits_with_3_restarts_its_whole_group_and_only_it(
    clock: Clock, requeues: RecordedRequeues
) -> None:
    env = Env()
    serving_up(env)
    group1_uids = {
        p["metadata"]["uid"] for p in env.user.list("Pod", NS) if p["metadata"]["labels"][Labels.GROUP] == "1"
    }
    clock.advance(60)
    report(env, 0, 1, ready=False, restarts=1, exit_code=3)  # its group broke: it exited with 3
    env.run(reconcile, NAME)

    assert sorted(deleted_pods(env)) == [pod_name(0, 0), pod_name(0, 1)]
    assert {p["metadata"]["uid"] for p in env.user.list("Pod", NS)} == group1_uids  # the other group is untouched
    (event,) = restart_events(env)
    assert event["type"] == "Warning"
    assert f"group 0: rank pod {pod_name(0, 1)} exited with code 3 (Error)" in event["message"]
    assert event["involvedObject"]["kind"] == K2Serving.KIND and event["involvedObject"]["name"] == NAME
    restarted = group_status(env, 0)
    assert restarted["restarting"] is True and restarted["ready"] is False and restarted["restarts"] == 1
    assert restarted["lastRestartReason"] == f"rank pod {pod_name(0, 1)} exited with code 3 (Error)"
    assert restarted["lastRestartTime"] == "2026-01-01T00:01:00Z"
    assert group_status(env, 1) == {"group": 1, "ready": True, "readyRanks": 2, "restarting": False, "restarts": 0}
    status = env.get(K2Serving.KIND, NAME)["status"]
    assert status["readyGroups"] == 1  # the StatefulSet still counts 2 ready ranks; the gang restart says otherwise
    assert "group 0 restarting" in condition(env.get(K2Serving.KIND, NAME), "Available")["message"]
    assert requeues.calls == []  # nothing held back

    env.run(reconcile, NAME)  # again, mid-restart: nothing more
    assert len(deleted_pods(env)) == 2 and len(restart_events(env)) == 1

    clock.advance(5)
    recreate_group(env, 0, ready=False)
    env.run(reconcile, NAME)
    assert group_status(env, 0)["restarting"] is True  # re-forming: not ready until every rank is
    for rank in (0, 1):
        report(env, 0, rank, ready=True)
    env.run(reconcile, NAME)
    assert group_status(env, 0) == {
        "group": 0,
        "ready": True,
        "readyRanks": 2,
        "restarting": False,
        "restarts": 1,
        "lastRestartTime": "2026-01-01T00:01:00Z",
        "lastRestartReason": f"rank pod {pod_name(0, 1)} exited with code 3 (Error)",
    }
    assert env.get(K2Serving.KIND, NAME)["status"]["readyGroups"] == 2
    assert len(deleted_pods(env)) == 2 and len(restart_events(env)) == 1


def test_the_backoff_holds_the_next_restart_back_and_requeues(clock: Clock, requeues: RecordedRequeues) -> None:
    env = Env()
    serving_up(env)
    report(env, 0, 0, ready=False, restarts=1, exit_code=3)
    env.run(reconcile, NAME)  # the first restart: at once
    clock.advance(4)
    recreate_group(env, 0)
    env.run(reconcile, NAME)
    assert record(env, 0).members  # formed again
    clock.advance(2)
    report(env, 0, 1, ready=False, restarts=1, exit_code=3)
    env.run(reconcile, NAME)  # 6 s after the first restart: the second waits until 10 s after it

    assert len(deleted_pods(env)) == 2 and len(restart_events(env)) == 1
    held = group_status(env, 0)
    assert held["restarting"] is True and held["ready"] is False
    assert held["nextRestartTime"] == "2026-01-01T00:00:10Z"
    assert requeues.calls == [(NS, NAME, T0 + dt.timedelta(seconds=10))]

    clock.advance(4)  # the requeue fires
    env.run(reconcile, NAME)
    assert sorted(deleted_pods(env)[2:]) == [pod_name(0, 0), pod_name(0, 1)]
    assert len(restart_events(env)) == 2
    assert any("(gang restart 2, 2 in a row;" in e["message"] for e in restart_events(env))
    assert "nextRestartTime" not in group_status(env, 0) and group_status(env, 0)["restarts"] == 2
    assert not any(name.startswith(f"{NAME}-g1") for name in deleted_pods(env))


def test_a_deleted_rank_pod_takes_its_peers_and_its_replacement_stays(clock: Clock, requeues: RecordedRequeues) -> None:
    env = Env()
    serving_up(env)
    env.user.delete("Pod", NS, pod_name(0, 1))
    start_rank(env, 0, 1)  # the StatefulSet's replacement
    report(env, 0, 1, ready=False)
    replacement = env.get("Pod", pod_name(0, 1))["metadata"]["uid"]
    env.run(reconcile, NAME)
    assert deleted_pods(env) == [pod_name(0, 1), pod_name(0, 0)]  # the user's delete, then the operator's
    assert env.get("Pod", pod_name(0, 1))["metadata"]["uid"] == replacement
    (event,) = restart_events(env)
    assert f"rank pod {pod_name(0, 1)} was deleted and recreated" in event["message"]


def test_an_interrupted_restart_resumes_after_an_operator_restart(clock: Clock, requeues: RecordedRequeues) -> None:
    env = Env()
    serving_up(env)
    report(env, 0, 1, ready=False, restarts=1, exit_code=3)
    env.cluster.fail("delete", "Pod", errors.Unavailable("503 the API server is going away", 503))
    with pytest.raises(errors.Unavailable):
        env.run(reconcile, NAME)  # the record is written, then the first delete fails
    assert record(env, 0).restarts == 1 and sorted(env.names("Pod"))[:2] == [pod_name(0, 0), pod_name(0, 1)]
    env.run(reconcile, NAME)  # a fresh reconcile (a restarted operator) reads the record from the StatefulSet
    assert sorted(env.names("Pod")) == [pod_name(1, 0), pod_name(1, 1)]
    assert record(env, 0).restarts == 1 and group_status(env, 0)["restarts"] == 1


def test_rolling_updates_and_suspend_are_not_failures(clock: Clock, requeues: RecordedRequeues) -> None:
    env = Env()
    serving_up(env)
    for group in (0, 1):
        stateful_set = env.get("StatefulSet", f"{NAME}-g{group}")
        env.set_status(
            "StatefulSet",
            f"{NAME}-g{group}",
            {
                "observedGeneration": stateful_set["metadata"]["generation"],
                "replicas": 2,
                "readyReplicas": 2,
                "updatedReplicas": 0,
                "updateRevision": "rev-2",
            },
        )
    env.run(reconcile, NAME)
    assert sorted(deleted_pods(env)) == [pod_name(0, 0), pod_name(0, 1)]  # one group at a time
    env.run(reconcile, NAME)
    assert len(deleted_pods(env)) == 2 and restart_events(env) == []
    assert record(env, 0).restarts == 0 and not group_status(env, 0)["restarting"]

    env.patch_spec(K2Serving.KIND, NAME, suspend=True)
    env.run(reconcile, NAME)
    assert env.get("StatefulSet", f"{NAME}-g1")["spec"]["replicas"] == 0
    env.user.delete("Pod", NS, pod_name(1, 0))  # the StatefulSet controller scales the group down
    env.run(reconcile, NAME)
    assert restart_events(env) == [] and record(env, 1).members == {}


def test_requeues_keep_the_earliest_timer_and_fire_a_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[tuple[str, str | None, str | None]] = []

    async def trigger(kind: str, namespace: str | None, name: str | None) -> None:
        fired.append((kind, namespace, name))

    monkeypatch.setattr(requeue, "trigger", trigger)
    monkeypatch.setattr(requeue, "now", lambda: T0)
    key = (K2Serving.KIND, NS, "a")

    async def scenario() -> None:
        requeues = Requeues()
        requeues.at(*key, T0 + dt.timedelta(seconds=300))
        first = requeues.timers[key][1]
        requeues.at(*key, T0 + dt.timedelta(seconds=600))  # later: the earlier timer stays
        assert requeues.timers[key][1] is first and not first.cancelled()
        requeues.at(*key, T0)  # earlier: replaces it, and fires at once
        assert first.cancelled()
        for _ in range(20):
            await asyncio.sleep(0)
            if fired:
                break
        assert key not in requeues.timers

    asyncio.run(scenario())
    assert fired == [key]
