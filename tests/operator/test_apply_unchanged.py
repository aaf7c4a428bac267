"""Children are applied only when they may differ from their manifest (`k2_operator.children`): a steady resource
costs no write, while a hand edit, a deletion, a spec change or an operator restart still leads to an apply that
repairs the child. The applies of one reconcile run concurrently, prerequisites (a Role, a ServiceAccount) before
what needs them (a RoleBinding, a workload)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from k2_api import K2Serving, K2Training
from k2_api.kube import Invalid, Object
from k2_operator import children as children_module
from k2_operator.children import APPLIED, Applied, apply_children, kinds_to_observe, needs_apply
from k2_operator.kube import FIELD_MANAGER
from k2_operator.serving import reconcile as reconcile_serving
from k2_operator.training import reconcile as reconcile_training
from tests.operator.fake_env import NS, Env

SERVING, TRAINING = "k2-debug-serve", "k2-debug-train"
SERVING_CHILDREN = 13  # model ConfigMap, ServiceAccount, Role, RoleBinding, 2 x (Service, StatefulSet), Deployment,
# frontend Service, 3 NetworkPolicies
TRAINING_CHILDREN = 6  # ConfigMap, Service, ServiceAccount, Role, RoleBinding, Job


def applies(env: Env) -> list[tuple[str, str]]:
    return [(c.kind, c.name) for c in env.cluster.writes("apply") if c.manager == FIELD_MANAGER]


def applied_between(env: Env, before: int) -> list[tuple[str, str]]:
    return applies(env)[before:]


def serving_env() -> Env:
    env = Env()
    env.create_example("k2serving-debug.yaml")
    env.run(reconcile_serving, SERVING)
    return env


def test_needs_apply_unless_the_child_is_what_the_last_apply_of_the_same_manifest_left() -> None:
    last = Applied(uid="u1", resource_version="7", digest="d")
    same = {"metadata": {"uid": "u1", "resourceVersion": "7"}}
    assert not needs_apply(last, "d", same)
    assert needs_apply(None, "d", same)  # never applied by this process (a restart)
    assert needs_apply(last, "other", same)  # the manifest changed
    assert needs_apply(last, "d", None)  # deleted
    assert needs_apply(last, "d", {"metadata": {"uid": "u1", "resourceVersion": "8"}})  # written since
    assert needs_apply(last, "d", {"metadata": {"uid": "u2", "resourceVersion": "7"}})  # recreated


def test_a_steady_serving_and_training_are_reconciled_without_a_write() -> None:
    env = serving_env()
    env.create_example("k2training-debug.yaml")
    env.run(reconcile_training, TRAINING)
    first = applies(env)
    assert len([a for a in first if a[1].startswith(SERVING)]) == SERVING_CHILDREN
    assert len([a for a in first if a[1].startswith(TRAINING)]) == TRAINING_CHILDREN
    writes = len(env.cluster.calls)
    for _ in range(3):
        env.run(reconcile_serving, SERVING)
        env.run(reconcile_training, TRAINING)
    assert env.cluster.calls[writes:] == []  # no apply, no status write, no Event


def test_a_hand_edited_child_is_repaired_on_the_next_reconcile() -> None:
    env = serving_env()
    config = env.get("ConfigMap", f"{SERVING}-model")
    stateful_set = env.get("StatefulSet", f"{SERVING}-g1")
    env.user.merge_patch(
        "ConfigMap", NS, f"{SERVING}-model", {"data": {"model.json": "{}"}}, config["metadata"]["resourceVersion"]
    )
    env.user.merge_patch(
        "StatefulSet", NS, f"{SERVING}-g1", {"spec": {"replicas": 5}}, stateful_set["metadata"]["resourceVersion"]
    )
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    assert sorted(applied_between(env, before)) == [("ConfigMap", f"{SERVING}-model"), ("StatefulSet", f"{SERVING}-g1")]
    assert env.get("ConfigMap", f"{SERVING}-model")["data"]["model.json"] == config["data"]["model.json"]
    assert env.get("StatefulSet", f"{SERVING}-g1")["spec"]["replicas"] == 2
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    assert applied_between(env, before) == []  # repaired and remembered


def test_a_deleted_child_is_recreated_and_a_status_change_costs_one_no_op_apply() -> None:
    env = serving_env()
    env.user.delete("Service", NS, f"{SERVING}-g0")
    env.set_status("StatefulSet", f"{SERVING}-g0", {"replicas": 2, "readyReplicas": 1})
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    assert sorted(applied_between(env, before)) == [("Service", f"{SERVING}-g0"), ("StatefulSet", f"{SERVING}-g0")]
    assert f"{SERVING}-g0" in env.names("Service")
    assert env.get(K2Serving.KIND, SERVING)["status"]["readyRanks"] == 1  # the status read from the apply's answer
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    assert applied_between(env, before) == []


def test_a_spec_change_applies_only_the_children_it_changes() -> None:
    env = serving_env()
    env.patch_spec(K2Serving.KIND, SERVING, frontend={"replicas": 3})
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    # The model ConfigMap carries the whole spec (the ranks read it); the Deployment runs the frontend.
    assert sorted(applied_between(env, before)) == [
        ("ConfigMap", f"{SERVING}-model"),
        ("Deployment", f"{SERVING}-frontend"),
    ]
    assert env.get("Deployment", f"{SERVING}-frontend")["spec"]["replicas"] == 3


def test_after_an_operator_restart_every_child_is_applied_once() -> None:
    env = serving_env()
    APPLIED.forget((K2Serving.KIND, NS, SERVING))  # what a new process starts with
    before = len(applies(env))
    env.run(reconcile_serving, SERVING)
    assert len(applied_between(env, before)) == SERVING_CHILDREN
    env.run(reconcile_serving, SERVING)
    assert len(applied_between(env, before)) == SERVING_CHILDREN


def test_only_a_reconcile_with_something_remembered_lists_every_child_kind() -> None:
    memory = children_module.AppliedChildren()
    owner = (K2Serving.KIND, NS, "x")
    assert kinds_to_observe(owner, ["ConfigMap", "StatefulSet"], ["StatefulSet"], memory) == {"StatefulSet"}
    memory.replace(owner, {("ConfigMap", NS, "x-model"): Applied("u", "1", "d")})
    assert kinds_to_observe(owner, ["ConfigMap", "StatefulSet"], ["StatefulSet"], memory) == {
        "ConfigMap",
        "StatefulSet",
    }


def test_a_deleted_resource_is_forgotten() -> None:
    env = Env()
    env.create_example("k2training-debug.yaml")
    env.run(reconcile_training, TRAINING)
    assert APPLIED.of((K2Training.KIND, NS, TRAINING))
    env.user.delete(K2Training.KIND, NS, TRAINING)
    env.run(reconcile_training, TRAINING)
    assert not APPLIED.of((K2Training.KIND, NS, TRAINING))


class StepKube:
    """An AsyncKube stand-in whose applies yield to the loop, recording how many were in flight and in what order
    they finished; `fail` names a child whose apply is refused."""

    def __init__(self, fail: str | None = None) -> None:
        self.in_flight = self.most_in_flight = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.fail = fail

    async def apply(self, manifest: Object) -> Object:
        self.started.append(manifest["kind"])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        self.in_flight -= 1
        name = manifest["metadata"]["name"]
        if name == self.fail:
            raise Invalid(f"{name}: refused", 422)
        self.finished.append(manifest["kind"])
        return {**manifest, "metadata": {**manifest["metadata"], "uid": f"uid-{name}", "resourceVersion": "1"}}


def manifest(kind: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": NS}}


def test_applies_run_concurrently_bounded_and_dependents_after_their_prerequisites(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(children_module, "MAX_CONCURRENT_APPLIES", 3)
    kube = StepKube()
    wanted = [
        manifest("RoleBinding", "b"),
        manifest("StatefulSet", "s0"),
        *(manifest("Role", f"r{i}") for i in range(5)),
    ]
    memory = children_module.AppliedChildren()
    current = asyncio.run(apply_children(kube, ("K2Serving", NS, "x"), wanted, {}, memory))  # type: ignore[arg-type]
    assert kube.most_in_flight == 3
    assert kube.started[5:] == ["StatefulSet", "RoleBinding"]  # the workload first
    assert kube.finished[:5] == ["Role"] * 5 and sorted(kube.finished[5:]) == ["RoleBinding", "StatefulSet"]
    assert set(current) == {
        ("StatefulSet", NS, "s0"),
        ("RoleBinding", NS, "b"),
        *(("Role", NS, f"r{i}") for i in range(5)),
    }
    assert len(memory.of(("K2Serving", NS, "x"))) == 7


def test_a_refused_prerequisite_stops_the_workloads_and_is_raised() -> None:
    kube = StepKube(fail="c1")
    wanted = [manifest("ConfigMap", "c0"), manifest("ConfigMap", "c1"), manifest("StatefulSet", "s0")]
    memory = children_module.AppliedChildren()
    with pytest.raises(Invalid, match="c1: refused"):
        asyncio.run(apply_children(kube, ("K2Serving", NS, "x"), wanted, {}, memory))  # type: ignore[arg-type]
    assert kube.finished == ["ConfigMap"]  # c0 applied, the StatefulSet never tried
    assert list(memory.of(("K2Serving", NS, "x"))) == [("ConfigMap", NS, "c0")]
