"""The real node: a kubelet with containerd runs pods for real, on a pod network that stays on this machine.

The tests use the session's cluster (`make cluster-up`'s, or the one the `cluster` fixture started) when it has the
real node, else they start their own (about 20 s); they
work in a namespace of their own and talk to the cluster only through 127.0.0.1 (the API server, kubectl exec and
port-forward). The pods talk to each other over the cluster's bridge.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.real_node import (
    has_real_node,
    lc,
    real_node_cluster,
    skip_unless_a_real_node_can_run,
    toolbox_pod,
)
from tests.support.cluster import Cluster
from tests.support.kube import apply, exists, get
from tests.support.paths import TOOLS_BIN
from tests.support.ports import free_port
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

REAL_POD_CIDR = ipaddress.ip_network("10.245.0.0/16")
GATEWAY = "10.245.0.1"
WORKER_IMAGE = "docker.io/k2-operator/worker:dev"
NS = f"t-real-node-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def real(cluster: Cluster) -> Iterator[Cluster]:
    if has_real_node(cluster):
        yield from _with_pods(cluster)
        return
    skip_unless_a_real_node_can_run()
    with real_node_cluster() as (cluster, _):
        yield from _with_pods(cluster)


def _with_pods(cluster: Cluster) -> Iterator[Cluster]:
    """The namespace NS with a web server pod, its Service and headless Service, and a client pod."""
    cluster.kubectl("create", "namespace", NS)
    try:
        wait_for("the namespace's ServiceAccount", lambda: exists(cluster, "serviceaccount/default", namespace=NS))
        web = toolbox_pod(
            "web",
            "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && echo serving && "
            "exec httpd -f -p 8080 -h /tmp/www",
            labels={"app": "web"},
        )
        apply(cluster, web, namespace=NS)
        apply(cluster, toolbox_pod("client", "exec sleep 3600"), namespace=NS)
        for name, cluster_ip in (("web", None), ("web-headless", "None")):
            service: dict[str, Any] = {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
            if cluster_ip:
                service["clusterIP"] = cluster_ip
            apply(
                cluster,
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": service},
                namespace=NS,
            )
        cluster.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/web", "pod/client", "--timeout=120s")
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def _in_client(cluster: Cluster, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("exec", "-n", NS, "client", "--", "sh", "-c", command, check=check)


def _http_get(host_port: str) -> str:
    """An HTTP/1.0 GET from the client pod with busybox nc (its wget needs glibc's resolver plugins)."""
    host, port = host_port.rsplit(":", 1)
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {port}"


def test_the_real_node_is_ready_on_containerd_with_8_gpus(real: Cluster) -> None:
    node = get(real, "node/real-node-0")
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert {"type": "InternalIP", "address": GATEWAY} in node["status"]["addresses"]
    assert node["metadata"]["labels"]["type"] == "real"
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])


def test_a_gpu_pod_runs_on_the_real_node_with_a_pod_address(real: Cluster) -> None:
    pod = toolbox_pod("gpu-one", "echo started; exec sleep 3600")
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    apply(real, pod, namespace=NS)
    real.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/gpu-one", "--timeout=60s")
    stored = get(real, "pod/gpu-one", namespace=NS)
    assert stored["spec"]["nodeName"] == "real-node-0"
    assert ipaddress.ip_address(stored["status"]["podIP"]) in REAL_POD_CIDR
    assert stored["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    logs = wait_for("the pod's log", lambda: real.kubectl("logs", "-n", NS, "gpu-one").stdout)
    assert logs == "started\n"


def test_pods_resolve_services_through_coredns_and_nothing_else(real: Cluster) -> None:
    cluster_ip = get(real, "service/web", namespace=NS)["spec"]["clusterIP"]
    web_ip = get(real, "pod/web", namespace=NS)["status"]["podIP"]
    assert f"nameserver {GATEWAY}" in _in_client(real, "cat /etc/resolv.conf").stdout
    assert f"Address: {cluster_ip}" in _in_client(real, f"nslookup web.{NS}.svc.cluster.local").stdout
    headless = wait_for(
        "the headless Service's A record",
        lambda: _in_client(real, f"nslookup web-headless.{NS}.svc.cluster.local", check=False).stdout.count(web_ip),
    )
    assert headless == 1
    outside = _in_client(real, "nslookup example.com", check=False)
    assert "REFUSED" in outside.stdout + outside.stderr, "CoreDNS answers only for the cluster's zones"


def test_pods_reach_each_other_by_pod_ip_cluster_ip_and_dns_name(real: Cluster) -> None:
    web_ip = get(real, "pod/web", namespace=NS)["status"]["podIP"]
    cluster_ip = get(real, "service/web", namespace=NS)["spec"]["clusterIP"]
    for target in (f"{web_ip}:8080", f"{cluster_ip}:80", "web:80", f"web-headless.{NS}.svc.cluster.local:8080"):
        reply = wait_for(f"web through {target}", lambda t=target: _in_client(real, _http_get(t), check=False).stdout)
        assert reply.startswith("HTTP/1.") and reply.endswith("hello-from-web\n"), target


def test_the_kubernetes_service_address_reaches_the_api_server(real: Cluster) -> None:
    # 10.96.0.1:443 is rewritten to the API server on the host's loopback; it answers plain HTTP with a TLS error.
    reply = _in_client(real, "printf 'GET /api HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.96.0.1 443").stdout
    assert reply.startswith("HTTP/1.0 400 Bad Request")
    assert "HTTPS server" in reply


def test_pods_have_no_route_beyond_the_cluster(real: Cluster) -> None:
    routes = _in_client(real, "ip route").stdout.splitlines()
    assert not any(r.startswith("default") for r in routes), routes
    assert sorted(r.split()[0] for r in routes) == ["10.245.0.0/16", "10.96.0.0/16"]
    # A documentation address (TEST-NET-3): with no route the kernel refuses before a packet is sent.
    dial = _in_client(real, "nc -w 2 203.0.113.1 80 </dev/null; echo exit=$?", check=False)
    assert "Network is unreachable" in dial.stdout + dial.stderr


def test_port_forward_reaches_a_pod_from_loopback(real: Cluster) -> None:
    port = free_port()
    forward = subprocess.Popen(
        [
            str(TOOLS_BIN / "kubectl"),
            f"--kubeconfig={real.kubeconfig}",
            "port-forward",
            "-n",
            NS,
            "pod/web",
            f"{port}:8080",
        ],
        env=real.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert forward.stdout is not None
        assert "Forwarding from 127.0.0.1" in forward.stdout.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.endswith(b"hello-from-web\n")
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_the_web_pods_log_is_read_through_the_api(real: Cluster) -> None:
    assert real.kubectl("logs", "-n", NS, "web").stdout == "serving\n"


def test_a_killed_container_is_restarted_by_the_kubelet(real: Cluster) -> None:
    # The shell is PID 1 (which ignores signals it has no handler for); killing its child ends the container.
    apply(real, toolbox_pod("restarts", "sleep 3600 & echo $! > /tmp/child; wait; exit 3"), namespace=NS)
    real.kubectl("wait", "-n", NS, "--for=condition=Ready", "pod/restarts", "--timeout=60s")
    real.kubectl("exec", "-n", NS, "restarts", "--", "sh", "-c", "kill -9 $(cat /tmp/child)")

    def restarted() -> dict[str, Any] | None:
        status = get(real, "pod/restarts", namespace=NS)["status"]["containerStatuses"][0]
        return status if status["restartCount"] >= 1 and status.get("ready") else None

    status = wait_for("the kubelet to restart the container", restarted)
    assert status["lastState"]["terminated"]["exitCode"] == 3


def test_a_second_real_node_is_refused_and_the_first_is_left_alone(real: Cluster, tmp_path: Path) -> None:
    with pytest.raises(lc.ClusterError, match=r"the real node of the cluster in /\S+ holds this machine"):
        lc.up(tmp_path / "second", num_nodes=1, real_node=True)
    assert not (tmp_path / "second" / "node").exists()
    lc.down(tmp_path / "second")
    node = get(real, "node/real-node-0")
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
    reply = wait_for("web through its Service", lambda: _in_client(real, _http_get("web:80"), check=False).stdout)
    assert reply.endswith("hello-from-web\n")


SELF_REVIEW = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
request = urllib.request.Request(
    "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews",
    data=json.dumps(review).encode(),
    headers={"Authorization": "Bearer " + open(sa + "/token").read(), "Content-Type": "application/json"},
)
context = ssl.create_default_context(cafile=sa + "/ca.crt")
answer = json.load(urllib.request.urlopen(request, context=context, timeout=10))
print(os.environ["KUBERNETES_SERVICE_HOST"], answer["status"]["userInfo"]["username"])
"""


def test_a_pods_service_account_token_authenticates_to_the_api_server(real: Cluster) -> None:
    images = {name for image in get(real, "node/real-node-0")["status"]["images"] for name in image.get("names") or []}
    if WORKER_IMAGE not in images:
        skip_or_fail(f"{WORKER_IMAGE} is not imported: run `make image`, then start the cluster again")
    container = {
        "name": "main",
        "image": WORKER_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/opt/k2/venv/bin/python", "-c", SELF_REVIEW],
        "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "self-review"},
        "spec": {"nodeSelector": {"type": "real"}, "restartPolicy": "Never", "containers": [container]},
    }
    apply(real, pod, namespace=NS)
    real.kubectl("wait", "-n", NS, "--for=jsonpath={.status.phase}=Succeeded", "pod/self-review", "--timeout=120s")
    # Through CoreDNS, the kubernetes Service address and TLS checked against the cluster CA, as the token's owner.
    assert real.kubectl("logs", "-n", NS, "self-review").stdout == f"10.96.0.1 system:serviceaccount:{NS}:default\n"
