"""The real node's kubelet: certificates, its KubeletConfiguration and command line (pure but for the certs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k2_api.contract import Labels

from . import pki
from .network import GATEWAY
from .nodes import GPU_PRODUCT, GPUS_PER_NODE

NODE_NAME = "real-node-0"
# Labels a kubelet may set on itself (NodeRestriction): the same GPU and topology labels as the kwok nodes.
NODE_LABELS = {
    "node.kubernetes.io/instance-type": "gpu-8x-h100",
    "topology.kubernetes.io/region": "local",
    "topology.kubernetes.io/zone": "zone-real",
    Labels.RACK: "rack-real",
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": GPU_PRODUCT,
    "nvidia.com/gpu.count": str(GPUS_PER_NODE),
    "type": "real",
}


def make_certs(pki_dir: Path) -> None:
    """The kubelet's client certificate (system:node:NAME, for NodeRestriction) and serving certificate."""
    pki.signed_cert(pki_dir, "kubelet-client", f"/O=system:nodes/CN=system:node:{NODE_NAME}", pki.CLIENT_AUTH)
    pki.signed_cert(pki_dir, "kubelet", f"/CN={NODE_NAME}", pki.server_auth([f"IP:{GATEWAY}", f"DNS:{NODE_NAME}"]))


def config(home: Path, pki_dir: Path, runtime_endpoint: str, port: int, healthz_port: int) -> dict[str, Any]:
    """The KubeletConfiguration of the real node: cgroupfs on cgroup v1, no QoS cgroups, private paths, no GC."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": GATEWAY,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki_dir / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": runtime_endpoint,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [GATEWAY],
        "clusterDomain": "cluster.local",
        "resolvConf": str(home / "resolv.conf"),
        "podLogsDir": str(home / "pod-logs"),
        "volumePluginDir": str(home / "volume-plugins"),
        # Imported images cannot be pulled again: never collect them, and never evict for the host's disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "syncFrequency": "10s",
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "maxPods": 110,
        "protectKernelDefaults": False,
        "kernelMemcgNotification": False,
    }


def resolv_conf() -> str:
    """The pods' resolv.conf for dnsPolicy Default: CoreDNS on the bridge, never the host's resolvers."""
    return f"nameserver {GATEWAY}\n"


def argv(kubelet_bin: Path, home: Path) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
    return [
        str(kubelet_bin),
        f"--config={home / 'config.yaml'}",
        f"--kubeconfig={home / 'kubeconfig'}",
        f"--root-dir={home / 'root'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={GATEWAY}",
        f"--node-labels={labels}",
        "--v=1",
    ]
