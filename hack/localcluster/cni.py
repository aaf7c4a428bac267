"""The real node's pod network: one bridge, addresses from host-local, routes only to the cluster's own ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .network import BRIDGE, GATEWAY, REAL_POD_CIDR
from .nodes import SERVICE_CIDR

NETWORK_NAME = "k2-local"
PLUGINS = ("bridge", "host-local", "loopback", "portmap")


def conflist(ipam_dir: Path) -> dict[str, Any]:
    """The CNI network: pods on BRIDGE, no masquerade, and no default route (only the Service range via the host).

    The pod range is on-link; Service addresses go to the gateway, where kube-proxy rewrites them to pod addresses.
    Nothing else is routable from a pod, so its traffic cannot leave this machine.
    """
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": REAL_POD_CIDR, "gateway": GATEWAY}]],
                    "routes": [{"dst": SERVICE_CIDR}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
