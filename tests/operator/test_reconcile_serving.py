"""The K2Serving reconcile against the fake API server: the owned children, the ExpertPlacement created once (its
spec then belongs to the EPLB controller), status written only on change, scale-down and the rolling restart."""

from __future__ import annotations

import pytest

from k2_api import ExpertPlacement, K2Serving
from k2_api.contract import FieldManagers, Ports
from k2_eplb.controller import Controller
from k2_eplb.planner import Reason
from k2_operator.main import parse_args
from k2_operator.runtime import RUNTIME
from k2_operator.serving import REVISION_LABEL, reconcile
from tests.eplb.helpers import field_managers
from tests.operator.fake_env import NS, Env, condition, controller_owner_uid, rank_pod

FILE = "k2serving-debug.yaml"  # 2 groups of 2 ranks, k2-debug (3 MoE layers of 8 experts)
NAME = "k2-debug-serve"


def test_create_makes_owned_children_and_writes_status_once() -> None:
    env = Env()
    uid = env.create_example(FILE)["metadata"]["uid"]
    env.run(reconcile, NAME)
    assert env.names("StatefulSet") == [f"{NAME}-g0", f"{NAME}-g1"]
    assert env.names("Deployment") == [f"{NAME}-frontend"]
    assert env.names(ExpertPlacement.KIND) == [NAME]
    for kind in ("StatefulSet", "Service", "Deployment", "ConfigMap", ExpertPlacement.KIND):
        assert all(controller_owner_uid(o) == uid for o in env.user.list(kind, NS)), kind
    placement = env.get(ExpertPlacement.KIND, NAME)
    assert (placement["spec"]["ranks"], placement["spec"]["slotsPerRank"], placement["spec"]["generation"]) == (2, 5, 1)
    status = env.get(K2Serving.KIND, NAME)["status"]
    assert status["placementName"] == NAME and status["groups"] == 2 and status["readyGroups"] == 0
    assert condition(env.get(K2Serving.KIND, NAME), "Available")["status"] == "False"
    assert env.status_writes(K2Serving.KIND) == 1
    env.run(reconcile, NAME)
    assert env.status_writes(K2Serving.KIND) == 1


def test_the_operator_creates_the_placement_once_and_the_eplb_controller_reshapes_it() -> None:
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    env.patch_spec(K2Serving.KIND, NAME, ranksPerGroup=4)
    env.run(reconcile, NAME)
    placement = env.get(ExpertPlacement.KIND, NAME)
    assert (placement["spec"]["ranks"], placement["spec"]["generation"]) == (2, 1)  # not the operator's to change
    writes = [(c.verb, c.manager) for c in env.cluster.writes(kind=ExpertPlacement.KIND)]
    assert writes == [("create", FieldManagers.OPERATOR)]

    controller = Controller(env.cluster.client(FieldManagers.EPLB), endpoints=lambda serving: [])
    (decision,) = controller.run_once(NS).values()
    assert decision.reason is Reason.RESHAPED
    env.run(reconcile, NAME)
    placement = env.get(ExpertPlacement.KIND, NAME)
    assert (placement["spec"]["ranks"], placement["spec"]["slotsPerRank"], placement["spec"]["generation"]) == (4, 3, 2)
    assert field_managers(placement) == {FieldManagers.EPLB}
    assert env.get(K2Serving.KIND, NAME)["status"]["placementName"] == NAME


def test_scale_down_deletes_the_groups_beyond_spec_groups() -> None:
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    env.patch_spec(K2Serving.KIND, NAME, groups=1)
    env.run(reconcile, NAME)
    assert env.names("StatefulSet") == [f"{NAME}-g0"]
    assert f"{NAME}-g1" not in env.names("Service") and f"{NAME}-g0" in env.names("Service")
    assert env.get(K2Serving.KIND, NAME)["status"]["groups"] == 1


def test_network_policies_are_applied_when_enabled_and_deleted_when_disabled() -> None:
    env = Env()
    uid = env.create_example(FILE)["metadata"]["uid"]
    env.run(reconcile, NAME)
    assert env.names("NetworkPolicy") == [f"{NAME}-frontend", f"{NAME}-g0", f"{NAME}-g1"]
    assert all(controller_owner_uid(p) == uid for p in env.user.list("NetworkPolicy", NS))
    metrics_rule = env.get("NetworkPolicy", f"{NAME}-g0")["spec"]["ingress"][2]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["monitoring"]
    env.patch_spec(K2Serving.KIND, NAME, groups=1)
    env.run(reconcile, NAME)
    assert env.names("NetworkPolicy") == [f"{NAME}-frontend", f"{NAME}-g0"]
    foreign = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "user", "namespace": NS},
    }
    env.user.create({**foreign, "spec": {"podSelector": {}}})
    env.patch_spec(K2Serving.KIND, NAME, networkPolicy={"enabled": False})
    env.run(reconcile, NAME)
    assert env.names("NetworkPolicy") == ["user"]  # only the serving's own went
    assert env.names("StatefulSet") == [f"{NAME}-g0"]
    env.patch_spec(K2Serving.KIND, NAME, networkPolicy={"enabled": True})
    env.run(reconcile, NAME)
    assert sorted(env.names("NetworkPolicy")) == [f"{NAME}-frontend", f"{NAME}-g0", "user"]


def test_the_monitoring_namespaces_come_from_the_operator_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RUNTIME, "monitoring_namespaces", ["observability"])
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    metrics_rule = env.get("NetworkPolicy", f"{NAME}-g1")["spec"]["ingress"][2]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == ["observability"]
    assert metrics_rule["ports"] == [{"port": Ports.METRICS, "protocol": "TCP"}]


def test_the_monitoring_namespace_flag() -> None:
    assert parse_args([]).monitoring_namespace == []
    args = parse_args(["--monitoring-namespace", "a", "--monitoring-namespace", "b"])
    assert args.monitoring_namespace == ["a", "b"]


def test_an_outdated_group_restarts_one_at_a_time() -> None:
    env = Env()
    env.create_example(FILE)  # rollout.maxUnavailableGroups: 1
    env.run(reconcile, NAME)
    for group in (0, 1):
        stateful_set = env.get("StatefulSet", f"{NAME}-g{group}")
        env.set_status(
            "StatefulSet",
            f"{NAME}-g{group}",
            {
                "observedGeneration": stateful_set["metadata"]["generation"],
                "replicas": 2,
                "readyReplicas": 2,
                "updatedReplicas": 0,  # both groups run an old template
                "updateRevision": "rev-2",
            },
        )
        for rank in (0, 1):
            env.user.create(rank_pod(NAME, group, rank, {REVISION_LABEL: "rev-1"}))
    env.run(reconcile, NAME)
    assert env.names("Pod") == [f"{NAME}-g1-0", f"{NAME}-g1-1"]  # group 0 goes first; group 1 still serves
    assert env.get(K2Serving.KIND, NAME)["status"]["readyGroups"] == 2  # as the StatefulSets last reported
