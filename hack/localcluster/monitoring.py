"""The local cluster's Prometheus: one process on 127.0.0.1 that scrapes the real node's rank pods.

It finds them through `kubernetes_sd_configs` against the local API server (prometheus.py renders the job). This
machine reaches it at 127.0.0.1:PORT; the real node's pods (the chart's EPLB controller) at GATEWAY:PORT, which a
K2-PREROUTING rule rewrites to 127.0.0.1:PORT, as the `kubernetes` Service address reaches the apiserver. The binary
is built by `make tools` (hack/build-tools.sh: Kubernetes discovery only, no web UI assets; the HTTP API is enough).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import api, network, processes
from .errors import ClusterError
from .layout import Layout
from .prometheus import prometheus_config, rank_scrape_config

PROGRAM = "prometheus"
SCRAPE_INTERVAL_S = 5.0  # the live-loop e2e and the EPLB controller need fresh per-expert counts
RETENTION = "2h"  # a local cluster's history: enough for a demo's rate() windows, small on disk


@dataclass(frozen=True)
class PrometheusFiles:
    """Where one Prometheus keeps its configuration, its TSDB and its log."""

    home: Path
    log: Path

    @classmethod
    def of(cls, layout: Layout) -> PrometheusFiles:
        """The cluster's own Prometheus: `prometheus/` in the cluster directory, its log beside the others."""
        return cls(layout.prometheus, layout.log(PROGRAM))

    @property
    def config(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def data(self) -> Path:
        return self.home / "data"

    def owner(self) -> processes.Owner:
        return processes.Owner(self.home, (PROGRAM,))


def config(layout: Layout, server: str) -> dict[str, Any]:
    """The configuration: the rank job through `server` with the admin certificate, real-node pods only."""
    pki = layout.pki
    scrape = rank_scrape_config(
        server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key", pod_cidr=network.REAL_POD_CIDR
    )
    return prometheus_config(scrape, SCRAPE_INTERVAL_S)


def argv(binary: Path, files: PrometheusFiles, port: int) -> list[str]:
    """The command line: HTTP API on 127.0.0.1:`port` only, TSDB in `files.data` with a short retention."""
    return [
        str(binary),
        f"--config.file={files.config}",
        f"--storage.tsdb.path={files.data}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def ready(port: int) -> bool:
    return api.healthz_ok(f"http://127.0.0.1:{port}/-/ready")


def start(
    layout: Layout, server: str, files: PrometheusFiles, port: int, tools: Path, on_gateway: bool
) -> subprocess.Popen[bytes]:
    """Starts Prometheus for the cluster of `layout` (apiserver `server`) and waits until it is ready.

    With `on_gateway` the real node's pods reach it too. On failure the process is stopped again.
    """
    binary = tools / PROGRAM
    if not binary.is_file():
        raise ClusterError(f"{binary} is missing: run `make tools` (it builds Prometheus with Kubernetes discovery)")
    files.data.mkdir(parents=True, exist_ok=True)
    files.config.write_text(yaml.safe_dump(config(layout, server), sort_keys=False))
    process = processes.spawn(argv(binary, files, port), files.log, cwd=files.home)
    try:
        processes.wait_for(f"Prometheus on 127.0.0.1:{port}", lambda: ready(port), PROGRAM, files.log, process)
        if on_gateway:
            network.expose_on_gateway(port)
    except BaseException:
        stop(process.pid, files, port, on_gateway)
        raise
    return process


def stop(pid: int, files: PrometheusFiles, port: int, on_gateway: bool) -> None:
    """Stops the Prometheus `pid` (when it is still ours) and withdraws its gateway rule. Idempotent."""
    if on_gateway and network.bridge_exists():
        network.withdraw_from_gateway(port)
    processes.stop_group(pid, files.owner(), grace_s=10.0)
