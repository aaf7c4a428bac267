"""The local cluster's Prometheus scrape job (hack/localcluster/prometheus.py): `kubernetes_sd_configs` relabelling
that keeps exactly the serving ranks' metrics ports.

The live discovery through the local API server, with the Prometheus that `make tools` builds (Debian's has no
Kubernetes discovery), is tests/cluster/test_local_prometheus.py."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

from k2_api import K2Serving
from k2_api.contract import PortNames
from k2_operator.builders.serving import frontend_deployment, group_stateful_set
from tests.operator.resources import example, stored
from tests.support.cluster import load_local_cluster


def local_prometheus() -> ModuleType:
    load_local_cluster()  # puts hack/ on sys.path
    return importlib.import_module("localcluster.prometheus")


def meta_name(label: str) -> str:
    """A pod label as Prometheus spells it in `__meta_kubernetes_pod_label_<name>`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def test_the_scrape_job_keeps_exactly_the_rank_pods_of_the_operator() -> None:
    """The keep rules select what the operator puts on rank pods (and what the chart's PodMonitor selects)."""
    serving = K2Serving.model_validate(stored(example("k2serving-debug.yaml")))
    rank = {
        meta_name(k): v for k, v in group_stateful_set(serving, 0)["spec"]["template"]["metadata"]["labels"].items()
    }
    front = {meta_name(k): v for k, v in frontend_deployment(serving)["spec"]["template"]["metadata"]["labels"].items()}
    wanted = local_prometheus().RANK_LABELS
    assert wanted.items() <= rank.items() and not wanted.items() <= front.items()
    scrape = local_prometheus().rank_scrape_config("https://127.0.0.1:1", Path("ca"), Path("c"), Path("k"))
    keeps = {r["source_labels"][0]: r["regex"] for r in scrape["relabel_configs"] if r.get("action") == "keep"}
    assert keeps.pop("__meta_kubernetes_pod_container_port_name") == PortNames.METRICS
    assert keeps == {f"__meta_kubernetes_pod_label_{k}": v for k, v in wanted.items()}
    assert "namespaces" not in scrape["kubernetes_sd_configs"][0]  # all namespaces unless told
