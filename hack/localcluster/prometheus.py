"""Prometheus configuration for the local cluster: discover the serving ranks through `kubernetes_sd_configs`.

The same selection as the chart's PodMonitor (charts/k2-operator/templates/podmonitor.yaml): pods labelled
`app.kubernetes.io/name=k2`, `app.kubernetes.io/component=rank`, `k2.ai/kind=K2Serving`, their container port named
`metrics`. Prometheus authenticates to the local API server with the admin client certificate; the series get the
`namespace` and `pod` labels the EPLB controller's queries select by (the ranks add `serving`, `group`, `rank`).
The local cluster also keeps only pod addresses on the real node's bridge: kwok's pods have fake addresses that
nothing may dial.
"""

from __future__ import annotations

import ipaddress
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


def address_regex(cidr: str) -> str:
    """A Prometheus regex (anchored) matching exactly the IPv4 addresses of `cidr`, whose prefix is whole octets."""
    network = ipaddress.IPv4Network(cidr)
    assert network.prefixlen % 8 == 0, cidr
    fixed = str(network.network_address).split(".")[: network.prefixlen // 8]
    return r"\.".join([*fixed, *[r"\d+"] * (4 - len(fixed))])


def rank_scrape_config(
    server: str,
    ca_file: Path,
    cert_file: Path,
    key_file: Path,
    namespaces: Sequence[str] = (),
    pod_cidr: str | None = None,
) -> dict[str, Any]:
    """The `k2-ranks` scrape job: rank pods of `namespaces` (all when empty) found through the API server, only those
    with an address in `pod_cidr` when given."""
    tls = {"ca_file": str(ca_file), "cert_file": str(cert_file), "key_file": str(key_file)}
    return scrape_job({"role": "pod", "api_server": server, "tls_config": tls}, namespaces, pod_cidr)


def in_cluster_scrape_config(namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """The same job for a Prometheus that runs as a pod (hack/kind-e2e.sh): discovery through its ServiceAccount."""
    return scrape_job({"role": "pod"}, namespaces, None)


def scrape_job(discovery: dict[str, Any], namespaces: Sequence[str], pod_cidr: str | None) -> dict[str, Any]:
    if namespaces:
        discovery = {**discovery, "namespaces": {"names": list(namespaces)}}
    relabel = [keep(f"__meta_kubernetes_pod_label_{name}", value) for name, value in RANK_LABELS.items()]
    relabel += [
        keep("__meta_kubernetes_pod_container_port_name", METRICS_PORT_NAME),
        *([keep("__meta_kubernetes_pod_ip", address_regex(pod_cidr))] if pod_cidr else []),
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    return {
        "job_name": "k2-ranks",
        "metrics_path": "/metrics",
        # Prometheus 3 refuses a target without a known Content-Type unless told what to parse it as; our exporters
        # (prometheus_client, or a static file in the tests) write the classic text format.
        "fallback_scrape_protocol": "PrometheusText0.0.4",
        "kubernetes_sd_configs": [discovery],
        "relabel_configs": relabel,
    }


def prometheus_config(scrape: dict[str, Any], interval_s: float = 5.0) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "scrape_configs": [scrape],
    }
