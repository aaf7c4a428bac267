"""A real Kubernetes control plane on loopback, for tests and local runs: no Docker, no registry.

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (binaries from `.tools/bin`, built
by `make tools`) as background processes, each in its own process group, and creates fake GPU nodes that kwok keeps
Ready. With `--real-node` it also runs a kubelet node on this machine (containerd + runc, kube-proxy, CoreDNS, a pod
bridge that stays on this machine), whose pods run for real. `down` stops everything, removes what the real node
added to the host, and removes the state directory. Everything lives in one directory (default `.cluster/`):

    pki/                CA, apiserver serving cert, admin client cert (O=system:masters), service-account key pair,
                        front-proxy CA and client cert (aggregation layer), kubelet certs
    kubeconfig          admin kubeconfig (server https://127.0.0.1:PORT, certificates embedded)
    etcd/               etcd data
    node/               the real node: containerd, kubelet, kube-proxy, CoreDNS and CNI files
    logs/NAME.log       one log per component
    state.json          ports, process ids, host settings to restore

Usage: local_cluster.py up|down|status [--dir DIR] [--nodes N] [--real-node]. `up` is idempotent (a healthy cluster
is kept) and `down` with nothing running is a no-op.

This file is the entry script; the code is the package `hack/localcluster/`. Tests import this file by path
(tests/support/cluster.py), so it puts its own directory on `sys.path` and re-exports the package's public names.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localcluster.api import api_request, apiserver_ready
from localcluster.cli import main
from localcluster.cluster import describe_nodes, down, is_healthy, leftover_pids, leftovers, owner, real_node_holder, up
from localcluster.controlplane import COMPONENTS, SA_ISSUER, STAGES_FILE, Ports, command_lines, free_ports
from localcluster.errors import ClusterError
from localcluster.layout import DEFAULT_DIR, ROOT, TOOLS_BIN, Layout, State
from localcluster.nodes import (
    FAKE_NODE_ANNOTATION,
    GPU_PRODUCT,
    GPUS_PER_NODE,
    MAX_NODES,
    NODE_IP,
    NODES_PER_RACK,
    NUM_NODES,
    POD_CIDR,
    RACKS_PER_ZONE,
    SERVICE_CIDR,
    gpu_node_manifest,
)
from localcluster.pki import kubeconfig_document, make_pki
from localcluster.processes import START_TIMEOUT_S

__all__ = [
    "COMPONENTS",
    "DEFAULT_DIR",
    "FAKE_NODE_ANNOTATION",
    "GPUS_PER_NODE",
    "GPU_PRODUCT",
    "MAX_NODES",
    "NODES_PER_RACK",
    "NODE_IP",
    "NUM_NODES",
    "POD_CIDR",
    "RACKS_PER_ZONE",
    "ROOT",
    "SA_ISSUER",
    "SERVICE_CIDR",
    "STAGES_FILE",
    "START_TIMEOUT_S",
    "TOOLS_BIN",
    "ClusterError",
    "Layout",
    "Ports",
    "State",
    "api_request",
    "apiserver_ready",
    "command_lines",
    "describe_nodes",
    "down",
    "free_ports",
    "gpu_node_manifest",
    "is_healthy",
    "kubeconfig_document",
    "leftover_pids",
    "leftovers",
    "main",
    "make_pki",
    "owner",
    "real_node_holder",
    "up",
]

if __name__ == "__main__":
    sys.exit(main())
