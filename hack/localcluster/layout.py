"""Where every file of one cluster lives, and the state (ports, process ids) recorded on disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .network import GATEWAY

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".cluster"
TOOLS_BIN = ROOT / ".tools" / "bin"


@dataclass(frozen=True)
class Layout:
    """The files of the cluster in directory `root`."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def node(self) -> Path:
        """The real node's files: containerd, kubelet, kube-proxy, CoreDNS, CNI."""
        return self.root / "node"

    @property
    def prometheus(self) -> Path:
        """Prometheus' configuration and TSDB (it runs with the real node)."""
        return self.root / "prometheus"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"


@dataclass
class State:
    """What `up` records in state.json: the ports picked, the pid of each component, whether start finished."""

    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    ready: bool = False
    real_node: bool = False
    host: dict[str, Any] = field(default_factory=dict)  # what the real node changed on the host, to restore

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def prometheus_url(self) -> str | None:
        """The cluster's Prometheus as this machine reaches it; None when the cluster runs none."""
        port = self.ports.get("prometheus")
        return None if port is None else f"http://127.0.0.1:{port}"

    @property
    def prometheus_pod_url(self) -> str | None:
        """The same Prometheus as the real node's pods reach it (the bridge gateway, rewritten to 127.0.0.1)."""
        port = self.ports.get("prometheus")
        return None if port is None else f"http://{GATEWAY}:{port}"

    def save(self, layout: Layout) -> None:
        tmp = layout.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(layout.state)

    @classmethod
    def load(cls, layout: Layout) -> State | None:
        try:
            data = json.loads(layout.state.read_text())
        except (OSError, ValueError):
            return None
        return cls(
            ports=data["ports"],
            pids=data.get("pids", {}),
            ready=bool(data.get("ready")),
            real_node=bool(data.get("real_node")),
            host=data.get("host", {}),
        )
