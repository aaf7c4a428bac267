"""What the operator's pods rely on, run by the real kubelet: the image, mounted ConfigMaps, the downward API, probes.

Like test_real_node.py, the tests use the session's cluster (`make cluster-up`'s, or the one the `cluster` fixture
started) when it has the real node, else they start their own. They work in a namespace of their own (Pod Security
`restricted` enforced), deleted at the end. Every pod is pinned to the real node by its hostname label: the kwok
nodes never run a container.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.real_node import real_node_cluster, skip_unless_a_real_node_can_run, toolbox_pod
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, exists, get, items, patch
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

WORKER_IMAGE = "docker.io/k2-operator/worker:dev"
NS = f"t-real-pods-{uuid.uuid4().hex[:6]}"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# The kubelet's syncFrequency is 10 s (hack/localcluster/kubelet.py); with the default Watch strategy a ConfigMap
# change reaches the volume at the pod's next sync at the latest. 120 s bounds a loaded machine, not the usual delay.
CONFIGMAP_SYNC_TIMEOUT_S = 120.0
RESTRICTED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _real_nodes(cluster: Cluster) -> list[str]:
    """The names of the nodes that are not kwok's."""
    return [node["metadata"]["name"] for node in items(cluster, "nodes", selector="type!=kwok")]


@pytest.fixture(scope="module")
def real(cluster: Cluster) -> Iterator[Cluster]:
    if _real_nodes(cluster):
        yield from _in_namespace(cluster)
        return
    skip_unless_a_real_node_can_run()
    with real_node_cluster() as (own, _):
        yield from _in_namespace(own)


def _in_namespace(cluster: Cluster) -> Iterator[Cluster]:
    """The namespace NS (Pod Security `restricted` enforced) for the duration of the module."""
    cluster.kubectl("create", "namespace", NS)
    try:
        cluster.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")
        wait_for("the namespace's ServiceAccount", lambda: exists(cluster, "serviceaccount/default", namespace=NS))
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.fixture(scope="module")
def real_node(real: Cluster) -> str:
    """The name of the one node that is not kwok's."""
    names = _real_nodes(real)
    assert len(names) == 1, names
    return names[0]


def _pinned(pod: dict[str, Any], node: str) -> dict[str, Any]:
    """`pod` on `node` only, restricted by Pod Security: non-root, read-only root, no capabilities, an emptyDir /tmp."""
    spec = pod["spec"]
    spec["nodeSelector"] = {HOSTNAME_LABEL: node}
    spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532}
    spec["terminationGracePeriodSeconds"] = 1  # a shell or sleep as PID 1 ignores SIGTERM: the namespace goes faster
    spec.setdefault("volumes", []).append({"name": "tmp", "emptyDir": {}})
    for container in spec["containers"]:
        container["securityContext"] = RESTRICTED
        container.setdefault("volumeMounts", []).append({"name": "tmp", "mountPath": "/tmp"})
    return pod


def _exec(cluster: Cluster, pod: str, command: str) -> str:
    return cluster.kubectl("exec", "-n", NS, pod, "--", "sh", "-c", command).stdout


def _wait_ready(cluster: Cluster, *pods: str) -> None:
    refs = [f"pod/{pod}" for pod in pods]
    cluster.kubectl("wait", "-n", NS, "--for=condition=Ready", *refs, "--timeout=120s")


def test_the_worker_image_runs_k2_help_and_its_log_is_read_through_the_api(real: Cluster, real_node: str) -> None:
    """The project image under Pod Security `restricted`: as 65532, read-only root, no capabilities, seccomp."""
    images = {name for image in get(real, f"node/{real_node}")["status"]["images"] for name in image.get("names") or []}
    if WORKER_IMAGE not in images:
        skip_or_fail(f"{WORKER_IMAGE} is not imported: run `make image`, then start the cluster again")
    container = {"name": "main", "image": WORKER_IMAGE, "imagePullPolicy": "IfNotPresent", "args": ["--help"]}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "k2-help"},
        "spec": {"restartPolicy": "Never", "containers": [container]},
    }
    apply(real, _pinned(pod, real_node), namespace=NS)
    real.kubectl("wait", "-n", NS, "--for=jsonpath={.status.phase}=Succeeded", "pod/k2-help", "--timeout=120s")
    stored = get(real, "pod/k2-help", namespace=NS)
    assert stored["spec"]["nodeName"] == real_node
    state = stored["status"]["containerStatuses"][0]
    assert state["containerID"].startswith("containerd://")
    assert state["state"]["terminated"]["exitCode"] == 0
    usage = real.kubectl("logs", "-n", NS, "k2-help").stdout
    assert usage.startswith("usage: k2 <group> <command> [options]\n"), usage
    for command in ("k2 operator run", "k2 eplb run", "k2 worker train", "k2 worker serve"):
        assert f"\n  {command} " in usage, command


def test_a_configmap_update_reaches_the_mounted_file(real: Cluster, real_node: str) -> None:
    """Within the kubelet's sync period (`syncFrequency: 10s` in hack/localcluster/kubelet.py), bounded at 120 s."""
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "one"}}
    apply(real, configmap, namespace=NS)
    pod = toolbox_pod("reads-config", "exec sleep 3600")
    pod["spec"]["volumes"] = [{"name": "settings", "configMap": {"name": "settings"}}]
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "settings", "mountPath": "/etc/settings"}]
    apply(real, _pinned(pod, real_node), namespace=NS)
    _wait_ready(real, "reads-config")
    assert _exec(real, "reads-config", "cat /etc/settings/mode") == "one"

    patch(real, "configmap/settings", {"data": {"mode": "two", "added": "yes"}}, namespace=NS)

    def changed() -> str | None:
        files = _exec(real, "reads-config", "cat /etc/settings/mode /etc/settings/added 2>/dev/null; true")
        return files if not files.startswith("one") else None

    # Both keys change in one swap of the volume's ..data link: once `mode` is new, the added key is there too.
    assert wait_for("the update in the mounted file", changed, timeout_s=CONFIGMAP_SYNC_TIMEOUT_S) == "twoyes"


def test_the_downward_api_fills_env_and_files(real: Cluster, real_node: str) -> None:
    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env = {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "POD_ROLE": "metadata.labels['k2.ai/role']",
    }
    pod = toolbox_pod("downward", "exec sleep 3600", labels={"k2.ai/role": "rank", "app": "downward"})
    pod["metadata"]["annotations"] = {"k2.ai/note": 'says "hi"'}
    pod["spec"]["volumes"] = [
        {
            "name": "podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                ]
            },
        }
    ]
    container = pod["spec"]["containers"][0]
    container["env"] = [{"name": name, "valueFrom": field(path)} for name, path in env.items()]
    container["volumeMounts"] = [{"name": "podinfo", "mountPath": "/etc/podinfo"}]
    apply(real, _pinned(pod, real_node), namespace=NS)
    _wait_ready(real, "downward")

    pod_ip = get(real, "pod/downward", namespace=NS)["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip).version == 4
    printed = _exec(real, "downward", 'echo "$POD_NAME $POD_NAMESPACE $POD_IP $POD_ROLE"')
    assert printed == f"downward {NS} {pod_ip} rank\n"
    # One `key="value"` line per entry, sorted by key, values quoted as Go strings.
    assert _exec(real, "downward", "cat /etc/podinfo/labels") == 'app="downward"\nk2.ai/role="rank"'
    annotations = _exec(real, "downward", "cat /etc/podinfo/annotations").splitlines()
    assert 'k2.ai/note="says \\"hi\\""' in annotations


def _endpoint_of(cluster: Cluster, service: str, pod_ip: str) -> dict[str, Any] | None:
    """The endpoint with `pod_ip` in the Service's EndpointSlices, or None when no slice lists it."""
    slices = items(cluster, "endpointslices", namespace=NS, selector=f"kubernetes.io/service-name={service}")
    for endpoint in (e for s in slices for e in s.get("endpoints") or []):
        if pod_ip in endpoint["addresses"]:
            return dict(endpoint)
    return None


def _ready_endpoint(cluster: Cluster, service: str, pod_ip: str) -> dict[str, Any] | None:
    endpoint = _endpoint_of(cluster, service, pod_ip)
    return endpoint if endpoint is not None and endpoint["conditions"].get("ready") is True else None


def _not_ready(endpoint: dict[str, Any] | None) -> bool:
    """Gone from the slices, or listed with `ready: false` (an absent `ready` would mean ready)."""
    return endpoint is None or endpoint["conditions"].get("ready") is False


def test_a_failing_readiness_probe_takes_the_pod_out_of_its_services_endpoints(real: Cluster, real_node: str) -> None:
    pod = toolbox_pod("probed", "touch /tmp/ready && exec sleep 3600", labels={"app": "probed"})
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "exec": {"command": ["cat", "/tmp/ready"]},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "probed"},
        "spec": {"selector": {"app": "probed"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    apply(real, service, namespace=NS)
    apply(real, _pinned(pod, real_node), namespace=NS)
    _wait_ready(real, "probed")
    pod_ip = get(real, "pod/probed", namespace=NS)["status"]["podIP"]
    endpoint = wait_for("the pod as a ready endpoint", lambda: _ready_endpoint(real, "probed", pod_ip))
    assert endpoint["targetRef"]["name"] == "probed"

    _exec(real, "probed", "rm /tmp/ready")
    wait_for("the endpoint to leave Ready", lambda: _not_ready(_endpoint_of(real, "probed", pod_ip)))
    ready = condition(get(real, "pod/probed", namespace=NS), "Ready")
    assert ready is not None and ready["status"] == "False"
    assert get(real, "pod/probed", namespace=NS)["status"]["containerStatuses"][0]["restartCount"] == 0

    _exec(real, "probed", "touch /tmp/ready")
    wait_for("the endpoint to be ready again", lambda: _ready_endpoint(real, "probed", pod_ip))
