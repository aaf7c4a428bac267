"""The control plane is the real one: pinned versions, fake GPU nodes with topology, working scheduling."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.cluster.manifests import container, kwok_pod_spec
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, get, is_ready, items
from tests.support.paths import TOOLS_BIN
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

TOPOLOGY_LABELS = ("topology.kubernetes.io/zone", "k2.ai/rack", "nvidia.com/gpu.product")


def _version_output(binary: str) -> str:
    return subprocess.run([str(TOOLS_BIN / binary), "--version"], capture_output=True, text=True, check=True).stdout


def test_binaries_print_pinned_versions(cluster: Cluster) -> None:
    assert re.search(r"^Kubernetes v1\.34\.\d+$", _version_output("kube-apiserver"), re.M)
    assert re.search(r"^etcd Version: 3\.6\.\d+$", _version_output("etcd"), re.M)
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert re.fullmatch(r"v1\.34\.\d+", server["gitVersion"]), server


def test_server_is_on_loopback_with_tls(cluster: Cluster) -> None:
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", cluster.server)
    assert cluster.env["KUBECONFIG"] == str(cluster.kubeconfig)


def test_fake_gpu_nodes_have_gpus_and_topology(cluster: Cluster) -> None:
    nodes = items(cluster, "nodes", selector="type=kwok")
    assert len(nodes) >= 4
    for node in nodes:
        name = node["metadata"]["name"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8", name
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8", name
        assert int(node["status"]["allocatable"]["cpu"]) >= 32, name
        assert all(node["metadata"]["labels"].get(label) for label in TOPOLOGY_LABELS), name
        assert not node["spec"].get("taints"), name
        ready = condition(node, "Ready")
        assert ready is not None and ready["status"] == "True", name
    racks = {node["metadata"]["labels"]["k2.ai/rack"] for node in nodes}
    assert len(racks) >= 2


def test_deployment_with_8_gpu_pods_runs_on_gpu_nodes(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "gpu-workers"}
    pod_spec = kwok_pod_spec(container(gpus=8))
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "gpu-workers"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    apply(cluster, deployment, namespace=namespace)

    def two_ready() -> list[dict[str, object]] | None:
        ready = [p for p in items(cluster, "pods", namespace=namespace, selector="app=gpu-workers") if is_ready(p)]
        return ready if len(ready) == 2 else None

    ready = wait_for("2 Ready pods of 8 GPUs", two_ready)
    node_names = [p["spec"]["nodeName"] for p in ready]  # type: ignore[index]
    assert len(set(node_names)) == 2, "two 8-GPU pods cannot share one 8-GPU node"
    for pod in ready:
        assert pod["status"]["podIP"].startswith("10.244."), pod["status"]  # type: ignore[index]
        node = get(cluster, "node", pod["spec"]["nodeName"])  # type: ignore[index]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    wait_for(
        "the Deployment to report 2 ready replicas",
        lambda: get(cluster, "deployment", "gpu-workers", namespace=namespace)["status"].get("readyReplicas") == 2,
    )


def test_pod_asking_9_gpus_stays_unschedulable(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {"containers": [container(gpus=9)]},
    }
    apply(cluster, pod, namespace=namespace)

    def unschedulable() -> dict[str, object] | None:
        scheduled = condition(get(cluster, "pod", "too-big", namespace=namespace), "PodScheduled")
        return scheduled if scheduled and scheduled.get("reason") == "Unschedulable" else None

    scheduled = wait_for("PodScheduled=False reason Unschedulable", unschedulable)
    assert scheduled["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in str(scheduled["message"])
    current = get(cluster, "pod", "too-big", namespace=namespace)
    assert current["status"]["phase"] == "Pending"
    assert not current["spec"].get("nodeName")
