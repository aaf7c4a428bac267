"""Golden tests of the pure builders: every child of the two examples, byte for byte.

Regenerate after an intended change with `K2_UPDATE_GOLDEN=1 pytest tests/operator/test_builders.py` and review the
diff of tests/operator/golden/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_api import ExpertPlacement, Preset, placement_problems
from k2_api.contract import PRESET_SHAPES, Env, ExitCodes, Files, Labels, Ports
from k2_operator.builders import network_policy as policy_builder
from k2_operator.builders import placement as placement_builder
from k2_operator.builders import serving as serving_builder
from k2_operator.builders import training as training_builder
from tests.operator.resources import serving, stored, training

GOLDEN = Path(__file__).parent / "golden"
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")


def check_golden(name: str, manifests: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(manifests, sort_keys=True)
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("K2_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with K2_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path}; if intended, regenerate with K2_UPDATE_GOLDEN=1"


def test_training_children_golden() -> None:
    check_golden("k2training-debug", training_builder.children(training(), attempt=0))


def test_training_restart_attempt_golden() -> None:
    check_golden("k2training-debug-attempt-2", [training_builder.job(training(), attempt=2, preemptions=1)])


def test_preemption_fails_the_job_by_pod_failure_policy_and_the_worker_explains_itself() -> None:
    spec = training_builder.job(training(), attempt=0)["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    exit_rule, disruption_rule = spec["podFailurePolicy"]["rules"]
    assert exit_rule["action"] == disruption_rule["action"] == "FailJob"
    assert exit_rule["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [75]}
    assert exit_rule["onExitCodes"]["values"] == [ExitCodes.PREEMPTED]
    assert disruption_rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert env(container)[Env.TERMINATION_LOG] == container["terminationMessagePath"] == Files.TERMINATION_LOG
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["backoffLimit"] == 0  # every other failure: BackoffLimitExceeded, a counted restart


def test_serving_children_golden() -> None:
    check_golden(
        "k2serving-debug", [*serving_builder.children(serving()), placement_builder.expert_placement(serving())]
    )


def test_serving_network_policies_golden() -> None:
    check_golden("k2serving-debug-network-policies", policy_builder.network_policies(serving(), ["monitoring"]))


def ingress_ports(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Port -> the peers that may reach it, over all of a policy's ingress rules."""
    peers: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            peers.setdefault(port["port"], []).extend(rule.get("from", [{"anyone": True}]))
    return peers


def test_rank_ports_admit_only_their_group_and_the_frontend_and_metrics_only_monitoring() -> None:
    group1 = policy_builder.group_network_policy(serving(), 1, ["prom", "monitoring", "prom"])
    ranks = {"app.kubernetes.io/instance": "k2-debug-serve", "app.kubernetes.io/component": "rank", Labels.GROUP: "1"}
    frontend = {"app.kubernetes.io/instance": "k2-debug-serve", "app.kubernetes.io/component": "frontend"}
    assert group1["spec"]["podSelector"] == {"matchLabels": ranks}
    assert group1["spec"]["policyTypes"] == ["Ingress"]
    monitoring = {
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring", "prom"]}
            ]
        }
    }
    assert ingress_ports(group1) == {
        Ports.RENDEZVOUS: [{"podSelector": {"matchLabels": ranks}}],
        Ports.RANK_HTTP: [{"podSelector": {"matchLabels": ranks}}, {"podSelector": {"matchLabels": frontend}}],
        Ports.GRPC: [{"podSelector": {"matchLabels": frontend}}],
        Ports.METRICS: [monitoring],
    }
    closed = policy_builder.group_network_policy(serving(), 0, [])
    assert Ports.METRICS not in ingress_ports(closed)


def test_frontend_port_admits_the_namespace_or_anyone_when_exposed() -> None:
    inside = policy_builder.frontend_network_policy(serving(frontend={"port": 9000}))
    assert ingress_ports(inside) == {9000: [{"podSelector": {}}], Ports.GRPC: [{"podSelector": {}}]}
    exposed = policy_builder.frontend_network_policy(serving(frontend={"serviceType": "LoadBalancer"}))
    assert ingress_ports(exposed) == {Ports.FRONTEND: [{"anyone": True}], Ports.GRPC: [{"anyone": True}]}


def test_network_policies_follow_spec() -> None:
    assert [p["metadata"]["name"] for p in policy_builder.network_policies(serving(groups=3), ["m"])] == [
        "k2-debug-serve-g0",
        "k2-debug-serve-g1",
        "k2-debug-serve-g2",
        "k2-debug-serve-frontend",
    ]
    assert policy_builder.network_policies(serving(networkPolicy={"enabled": False}), ["m"]) == []


def all_children() -> list[dict[str, Any]]:
    return [
        *training_builder.children(training(), 0),
        *serving_builder.children(serving()),
        *policy_builder.network_policies(serving(), ["monitoring"]),
        placement_builder.expert_placement(serving()),
    ]


@pytest.mark.parametrize("child", all_children(), ids=lambda c: f"{c['kind']}/{c['metadata']['name']}")
def test_every_child_has_standard_labels_and_owner(child: dict[str, Any]) -> None:
    labels = child["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "k2"
    assert labels["app.kubernetes.io/managed-by"] == "k2-operator"
    assert all(labels[key] for key in STANDARD_LABELS)
    (owner,) = child["metadata"]["ownerReferences"]
    assert owner["controller"] is True and owner["uid"]


def pod_specs() -> list[dict[str, Any]]:
    workloads = [c for c in all_children() if c["kind"] in ("Job", "StatefulSet", "Deployment")]
    assert len(workloads) == 4
    return [w["spec"]["template"]["spec"] for w in workloads]


@pytest.mark.parametrize("pod", pod_specs())
def test_pods_meet_restricted_pod_security(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"] == {"drop": ["ALL"]}


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_training_job_is_a_torchrun_gang() -> None:
    job = training_builder.job(training(numNodes=3, gpusPerNode=8, procsPerNode=1), attempt=1)
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (3, 3, 0)
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    variables = env(container)
    assert variables["MASTER_ADDR"] == "k2-debug-train-worker-1-0.k2-debug-train-workers.ns1.svc"
    assert variables["WORLD_SIZE"] == "3"
    assert variables["RANK"] == {"fieldRef": {"fieldPath": training_builder.COMPLETION_INDEX}}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["command"][:3] == ["k2", "worker", "train"]
    assert spec["template"]["spec"]["subdomain"] == "k2-debug-train-workers"


def test_training_with_several_procs_per_node_uses_the_workers_launcher() -> None:
    job = training_builder.job(training(numNodes=2, gpusPerNode=4, procsPerNode=4), attempt=0)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "k2",
        "worker",
        "train",
        "--config",
        "/etc/k2/training.yaml",
        "--json",
        "--nproc-per-node",
        "4",
    ]
    assert env(container)["WORLD_SIZE"] == "8"
    assert env(container)["K2_METRICS_PORT"] == "9400"


def test_scheduling_fields_reach_the_pods() -> None:
    scheduling = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "high",
        "schedulerName": "volcano",
        "affinity": {"nodeAffinity": {}},
    }
    for pod in (
        training_builder.job(training(scheduling=scheduling), 0)["spec"]["template"]["spec"],
        serving_builder.group_stateful_set(serving(scheduling=scheduling), 0)["spec"]["template"]["spec"],
    ):
        assert pod["nodeSelector"] == {"gpu": "h100"}
        assert pod["schedulerName"] == "volcano"
        assert pod["priorityClassName"] == "high"
        assert pod["tolerations"][0]["key"] == "gpu"
        assert pod["affinity"] == {"nodeAffinity": {}}


def test_worker_role_allows_exactly_the_training_status() -> None:
    role = next(c for c in training_builder.rbac(training()) if c["kind"] == "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["k2.ai"],
            "resources": ["k2trainings/status"],
            "resourceNames": ["k2-debug-train"],
            "verbs": ["get", "patch"],
        }
    ]


def test_suspended_serving_scales_everything_to_zero() -> None:
    suspended = serving(suspend=True)
    assert serving_builder.group_stateful_set(suspended, 0)["spec"]["replicas"] == 0
    assert serving_builder.frontend_deployment(suspended)["spec"]["replicas"] == 0


def test_group_template_hash_changes_with_image_only_for_rank_inputs() -> None:
    base = serving_builder.rank_template_hash(serving())
    assert serving_builder.rank_template_hash(serving(image="k2:v2")) != base
    assert serving_builder.rank_template_hash(serving(groups=5)) == base  # scaling does not restart groups


@pytest.mark.parametrize("preset", list(Preset))
def test_initial_placement_is_valid_for_every_preset(preset: Preset) -> None:
    body = placement_builder.expert_placement(serving(model={"preset": preset.value}, ranksPerGroup=8))
    placement = ExpertPlacement.model_validate(stored(body))
    assert placement_problems(placement.spec) == []
    assert placement.spec.num_experts == PRESET_SHAPES[preset].n_routed_experts
