"""The control-plane components: their ports, command lines and health endpoints (pure, no I/O but free ports)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout
from .nodes import FAKE_NODE_ANNOTATION, NODE_IP, POD_CIDR, SERVICE_CIDR

STAGES_FILE = Path(__file__).resolve().parent.parent / "kwok-stages.yaml"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one cluster, picked free at start."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_set(count: int) -> list[int]:
    """`count` distinct free loopback ports, sorted."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(_free_port())
    return sorted(ports)


def free_ports() -> Ports:
    """Distinct free loopback ports, one per field of `Ports`."""
    return Ports(*free_port_set(len(Ports.__dataclass_fields__)))


def command_lines(layout: Layout, ports: Ports, tools: Path, real_node: bool = False) -> dict[str, list[str]]:
    """The argv of every component, in start order. With `real_node` the apiserver reaches kubelets by InternalIP
    and checks their serving certificates (the kwok nodes' fake addresses are unreachable routes then)."""
    pki, kubeconfig = layout.pki, str(layout.kubeconfig)
    etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
    peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
    client_auth = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}"]
    client_auth += [f"--authorization-kubeconfig={kubeconfig}"]
    # The real node's InternalIP is the bridge address (its Hostname resolves nowhere), its serving cert our CA's.
    kubelet_flags = ["--kubelet-preferred-address-types=InternalIP", f"--kubelet-certificate-authority={pki}/ca.crt"]
    kubelet_flags = kubelet_flags if real_node else []
    return {
        "etcd": [
            str(tools / "etcd"),
            "--name=k2-local",
            f"--data-dir={layout.root / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=k2-local={peer_url}",
            "--unsafe-no-fsync=true",  # a throwaway test store: durability is not worth the disk time
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(tools / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC",
            # Added to the default set, which already holds ServiceAccount, NamespaceLifecycle, ResourceQuota, ...
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            # Privileged pods pass the apiserver, so only PodSecurity admission can reject them.
            "--allow-privileged=true",
            # The advertise address is loopback: never publish it as the endpoint of Service `kubernetes`.
            "--endpoint-reconciler-type=none",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            *kubelet_flags,
            "--profiling=false",
            "--event-ttl=1h",
        ],
        "kube-controller-manager": [
            str(tools / "kube-controller-manager"),
            *client_auth,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controller_manager}",
            "--controllers=*",
            # These two enable the service-account token and root-CA publisher controllers.
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=false",
        ],
        "kube-scheduler": [
            str(tools / "kube-scheduler"),
            *client_auth,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.scheduler}",
        ],
        "kwok": [
            str(tools / "kwok"),
            f"--kubeconfig={kubeconfig}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={'='.join(FAKE_NODE_ANNOTATION)}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP.format(254)}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports.kwok}",
        ],
    }


def health_urls(ports: Ports) -> dict[str, str]:
    """The health endpoint of each component started after the apiserver."""
    return {
        "kube-controller-manager": f"https://127.0.0.1:{ports.controller_manager}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{ports.scheduler}/healthz",
        "kwok": f"http://127.0.0.1:{ports.kwok}/healthz",
    }
