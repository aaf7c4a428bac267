"""The address plan and the fake GPU nodes that kwok keeps Ready."""

from __future__ import annotations

from typing import Any

from k2_api.contract import Labels

# Address plan. The fake ranges are never contacted: only 127.0.0.1 carries traffic.
SERVICE_CIDR = "10.96.0.0/16"  # ClusterIPs allocated by the apiserver
POD_CIDR = "10.244.0.0/16"  # kwok's fallback pool; node i owns 10.244.i.0/24
NODE_IP = "10.250.0.{}"  # fake InternalIP of node i (1-based host part)

NUM_NODES = 4
MAX_NODES = 100  # node i owns 10.244.i.0/24 and 10.250.0.(i+1); zones are lettered
GPUS_PER_NODE = 8
NODES_PER_RACK = 2
RACKS_PER_ZONE = 2
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


def gpu_node_manifest(index: int) -> dict[str, Any]:
    """The Node object of fake GPU node `index`: 8 GPUs, a realistic host, topology labels, no taint."""
    name = f"gpu-node-{index}"
    rack = index // NODES_PER_RACK
    zone = "zone-" + "abcdefghijklmnopqrstuvwxyz"[rack // RACKS_PER_ZONE]
    resources = {
        "cpu": "96",
        "memory": "1Ti",
        "ephemeral-storage": "2Ti",
        "pods": "110",
        GPU_RESOURCE: str(GPUS_PER_NODE),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "gpu-8x-h100",
                "topology.kubernetes.io/region": "local",
                "topology.kubernetes.io/zone": zone,
                Labels.RACK: f"rack-{rack}",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(GPUS_PER_NODE),
                "type": "kwok",
            },
        },
        "spec": {
            "podCIDR": f"10.244.{index}.0/24",
            "podCIDRs": [f"10.244.{index}.0/24"],
            "providerID": f"kwok://{name}",
        },
        "status": {
            "allocatable": resources,
            "capacity": resources,
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP.format(index + 1)},
                {"type": "Hostname", "address": name},
            ],
        },
    }


def node_ready(node: dict[str, Any]) -> bool:
    """True when the Node object's Ready condition is True."""
    conditions = node.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def summarize(nodes: list[dict[str, Any]]) -> str:
    """One line: how many Ready nodes with how many GPUs each, e.g. `4 Ready x 8 nvidia.com/gpu`."""
    ready = [n for n in nodes if node_ready(n)]
    gpus = sorted({n["status"].get("allocatable", {}).get(GPU_RESOURCE, "0") for n in ready})
    return f"{len(ready)} Ready x {'/'.join(gpus) or '0'} {GPU_RESOURCE}"
