"""The local cluster's Prometheus configuration (hack/localcluster/prometheus.py) against the real local API server:
a real Prometheus discovers the serving ranks' metrics ports through `kubernetes_sd_configs`, and nothing else.
kwok pods are not reachable, so this checks discovery and relabelling, not the scrape itself."""

from __future__ import annotations

import base64
import importlib
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from k2_api import K2Serving
from k2_api.contract import PortNames, Ports
from k2_operator.builders.serving import frontend_deployment, group_stateful_set
from tests.operator.resources import KWOK_NODES, example, stored
from tests.support.cluster import Cluster, load_local_cluster
from tests.support.kube import apply
from tests.support.ports import free_port
from tests.support.waits import wait_for


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


def credentials(kubeconfig: Path, directory: Path) -> tuple[Path, Path, Path]:
    """CA, client certificate and key of the kubeconfig's current user, written out as files for Prometheus."""
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    paths = []
    for name, data in (
        ("ca.crt", cluster["certificate-authority-data"]),
        ("client.crt", user["client-certificate-data"]),
        ("client.key", user["client-key-data"]),
    ):
        path = directory / name
        path.write_bytes(base64.b64decode(data))
        paths.append(path)
    return paths[0], paths[1], paths[2]


@contextmanager
def prometheus(config: dict[str, Any], directory: Path) -> Iterator[str]:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.skip("prometheus is not installed (Debian package `prometheus`)")
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}"]
    argv.append(f"--web.listen-address=127.0.0.1:{port}")
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for("prometheus ready or exited", lambda: process.poll() is not None or ready(url), 30)
            if process.poll() is not None:
                output = (directory / "prometheus.log").read_text()
                if "field kubernetes_sd_configs not found" in output:
                    pytest.skip(f"{binary} is built without Kubernetes service discovery (Debian's +ds build drops it)")
                pytest.fail(f"prometheus exited with {process.returncode}: {output[-2000:]}")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=20)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def active_targets(url: str) -> list[dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/targets?state=active", timeout=2) as response:
            answer = json.loads(response.read())
    except OSError:
        return []
    return [t["labels"] for t in answer["data"]["activeTargets"]]


def pod(name: str, component: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "k2", "app.kubernetes.io/component": component, "k2.ai/kind": "K2Serving"}
    ports = [
        {"name": PortNames.HTTP, "containerPort": Ports.RANK_HTTP},
        {"name": PortNames.METRICS, "containerPort": Ports.METRICS},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": KWOK_NODES,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": "k2-operator/worker:dev",
                    "ports": ports,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
    }


@pytest.mark.prometheus
def test_prometheus_discovers_the_rank_metrics_ports_through_the_api_server(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    ca, cert, key = credentials(cluster.kubeconfig, tmp_path)
    scrape = local_prometheus().rank_scrape_config(cluster.server, ca, cert, key, namespaces=[namespace])
    apply(cluster, pod("rank-0", "rank"), namespace=namespace)
    apply(cluster, pod("frontend-0", "frontend"), namespace=namespace)
    with prometheus(local_prometheus().prometheus_config(scrape, interval_s=1), tmp_path) as url:
        wait_for("the rank pod as a target", lambda: any(t.get("pod") == "rank-0" for t in active_targets(url)), 60)
        targets = active_targets(url)
    assert [(t["job"], t["namespace"], t["pod"]) for t in targets] == [("k2-ranks", namespace, "rank-0")]
    assert targets[0]["instance"].endswith(f":{Ports.METRICS}")  # the metrics port only, not http
