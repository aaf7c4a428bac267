"""Prometheus configuration for the local cluster: discover the serving ranks through `kubernetes_sd_configs`.

The same selection as the chart's PodMonitor (charts/k2-operator/templates/podmonitor.yaml): pods labelled
`app.kubernetes.io/name=k2`, `app.kubernetes.io/component=rank`, `k2.ai/kind=K2Serving`, their container port named
`metrics`. Prometheus authenticates to the local API server with the admin client certificate; the series get the
`namespace` and `pod` labels the EPLB controller's queries select by (the ranks add `serving`, `group`, `rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

RANK_LABELS = {
    "app_kubernetes_io_name": "k2",
    "app_kubernetes_io_component": "rank",
    "k2_ai_kind": "K2Serving",
}
"""The rank pods' labels, as Prometheus spells them in `__meta_kubernetes_pod_label_<name>`."""
METRICS_PORT_NAME = "metrics"


def keep(source: str, value: str) -> dict[str, Any]:
    return {"source_labels": [source], "regex": value, "action": "keep"}


def rank_scrape_config(
    server: str, ca_file: Path, cert_file: Path, key_file: Path, namespaces: Sequence[str] = ()
) -> dict[str, Any]:
    """The `k2-ranks` scrape job: rank pods of `namespaces` (all when empty) found through the API server."""
    tls = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
    discovery: dict[str, Any] = {"role": "pod", "api_server": server, "tls_config": tls}
    if namespaces:
        discovery["namespaces"] = {"names": list(namespaces)}
    relabel = [keep(f"__meta_kubernetes_pod_label_{name}", value) for name, value in RANK_LABELS.items()]
    relabel += [
        keep("__meta_kubernetes_pod_container_port_name", METRICS_PORT_NAME),
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    return {
        "job_name": "k2-ranks",
        "metrics_path": "/metrics",
        "kubernetes_sd_configs": [discovery],
        "relabel_configs": relabel,
    }


def prometheus_config(scrape: dict[str, Any], interval_s: float = 5.0) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "scrape_configs": [scrape],
    }
