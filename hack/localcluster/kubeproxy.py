"""kube-proxy in iptables mode: ClusterIP Services on the real node. It changes no host-wide sysctl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .kubelet import NODE_NAME
from .network import GATEWAY, REAL_POD_CIDR


def config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "bindAddress": GATEWAY,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "clusterCIDR": REAL_POD_CIDR,
        # NodePorts only on the bridge address, never on the machine's uplink; none on localhost (route_localnet).
        "nodePortAddresses": [f"{GATEWAY}/32"],
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "1s"},
        # 0 leaves the host's conntrack settings as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def argv(kube_proxy_bin: Path, config_file: Path) -> list[str]:
    return [str(kube_proxy_bin), f"--config={config_file}"]
