"""kube-controller-manager and kwok at work: garbage collection, Jobs, StatefulSets, EndpointSlices, namespaces."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.cluster.manifests import container, kwok_pod_spec
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, exists, get, is_ready, items
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


def _config_map(name: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"]}
        metadata["ownerReferences"] = [{**ref, "uid": owner["metadata"]["uid"]}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"k": "v"}}


def test_deleting_an_owner_garbage_collects_its_children(cluster: Cluster, namespace: str) -> None:
    owner = apply(cluster, _config_map("owner"), namespace=namespace)
    apply(cluster, _config_map("child", owner), namespace=namespace)
    apply(cluster, _config_map("bystander"), namespace=namespace)
    assert exists(cluster, "configmap", "child", namespace=namespace)

    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=background")

    wait_for(
        "the child to be garbage-collected", lambda: not exists(cluster, "configmap", "child", namespace=namespace)
    )
    assert exists(cluster, "configmap", "bystander", namespace=namespace)


def test_indexed_job_completes(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "indexed"},
        "spec": {
            "completions": 3,
            "parallelism": 3,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {"spec": kwok_pod_spec(container(gpus=1), restartPolicy="Never")},
        },
    }
    apply(cluster, job, namespace=namespace)

    def complete() -> dict[str, Any] | None:
        current: dict[str, Any] = get(cluster, "job", "indexed", namespace=namespace)
        done = condition(current, "Complete")
        return current if done and done["status"] == "True" else None

    finished = wait_for("the Job to complete", complete)
    assert finished["status"]["succeeded"] == 3
    assert finished["status"]["completedIndexes"] == "0-2"
    job_pods = items(cluster, "pods", namespace=namespace, selector="batch.kubernetes.io/job-name=indexed")
    indexes = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in job_pods}
    assert indexes == {"0", "1", "2"}
    assert {p["status"]["phase"] for p in job_pods} == {"Succeeded"}


def test_fake_fail_annotation_fails_a_job_and_fake_run_duration_keeps_it_running(
    cluster: Cluster, namespace: str
) -> None:
    def job(name: str, annotations: dict[str, str]) -> dict[str, Any]:
        spec = kwok_pod_spec(restartPolicy="Never")
        template = {"metadata": {"annotations": annotations}, "spec": spec}
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": template},
        }

    apply(cluster, job("fails", {"k2.ai/fake-fail": "true"}), namespace=namespace)
    apply(cluster, job("runs", {"k2.ai/fake-run-duration": "1h"}), namespace=namespace)

    def failed() -> bool:
        done = condition(get(cluster, "job", "fails", namespace=namespace), "Failed")
        return done is not None and done["status"] == "True"

    wait_for("the Job with a failing pod to fail", failed)
    running = wait_for(
        "the long-running Job pod to be Ready",
        lambda: [
            p
            for p in items(cluster, "pods", namespace=namespace, selector="batch.kubernetes.io/job-name=runs")
            if is_ready(p)
        ],
    )
    # The failing Job is over, yet the 1h pod (started at about the same time) is still Running.
    assert running[0]["status"]["phase"] == "Running"
    assert get(cluster, "job", "runs", namespace=namespace)["status"].get("active") == 1


def test_statefulset_pods_become_ready(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "ranks"}
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "ranks"},
        "spec": {
            "replicas": 2,
            "serviceName": "ranks",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": kwok_pod_spec(container(gpus=4))},
        },
    }
    apply(cluster, statefulset, namespace=namespace)
    wait_for(
        "2 ready StatefulSet replicas",
        lambda: get(cluster, "statefulset", "ranks", namespace=namespace)["status"].get("readyReplicas") == 2,
    )
    names = sorted(p["metadata"]["name"] for p in items(cluster, "pods", namespace=namespace, selector="app=ranks"))
    assert names == ["ranks-0", "ranks-1"]


def test_endpointslices_list_ready_pods(cluster: Cluster, namespace: str) -> None:
    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": kwok_pod_spec()},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]},
    }
    apply(cluster, deployment, namespace=namespace)
    created = apply(cluster, service, namespace=namespace)
    assert created["spec"]["clusterIP"].startswith("10.96."), "ClusterIPs come from --service-cluster-ip-range"

    def ready_addresses() -> set[str] | None:
        slices = items(cluster, "endpointslices", namespace=namespace, selector="kubernetes.io/service-name=web")
        endpoints = [e for s in slices for e in s.get("endpoints") or []]
        addresses = {a for e in endpoints if e.get("conditions", {}).get("ready") for a in e["addresses"]}
        return addresses if len(addresses) == 2 else None

    addresses = wait_for("2 ready endpoints", ready_addresses)
    pod_ips = {p["status"]["podIP"] for p in items(cluster, "pods", namespace=namespace, selector="app=web")}
    assert addresses == pod_ips


def test_namespace_deletion_completes(cluster: Cluster) -> None:
    name = f"t-ns-delete-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    wait_for("the default ServiceAccount", lambda: exists(cluster, "serviceaccount", "default", namespace=name))
    apply(cluster, _config_map("data"), namespace=name)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": kwok_pod_spec()}
    apply(cluster, pod, namespace=name)
    wait_for("the pod to run", lambda: is_ready(get(cluster, "pod", "p", namespace=name)))

    cluster.kubectl("delete", "namespace", name, "--wait=false")

    wait_for("the namespace to be gone", lambda: not exists(cluster, "namespace", name), timeout_s=90)
