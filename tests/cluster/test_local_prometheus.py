"""The local cluster's Prometheus (hack/localcluster/monitoring.py): rank pods found through `kubernetes_sd_configs`.

The fast tests check the configuration and the command line. The live ones use the session cluster's real node (or
start a cluster with one) and the Prometheus that cluster records; a cluster started before the local Prometheus
existed has none, and then the module starts its own against it, in a temporary directory on a free port. On the real
node: a toolbox pod with the operator's rank labels and a `metrics` port is scraped and its series carry `namespace`
and `pod`; a pod without the labels, and a labelled pod on a kwok node (fake address), are not; a pod reaches the
same Prometheus at the pod-facing URL.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from k2_api import K2Serving
from k2_api.contract import PortNames
from k2_operator.builders.serving import group_stateful_set
from tests.cluster.real_node import has_real_node, real_node_cluster, skip_unless_a_real_node_can_run, toolbox_pod
from tests.operator.resources import example, stored
from tests.support.cluster import Cluster, load_local_cluster
from tests.support.kube import apply, exists, get
from tests.support.paths import TOOLS_BIN
from tests.support.ports import free_port
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

lc = load_local_cluster()  # puts hack/ on sys.path
from localcluster import api, cluster, monitoring, network  # noqa: E402

NS = f"t-local-prom-{uuid.uuid4().hex[:6]}"
PROBE = uuid.uuid4().hex[:12]
METRICS_PORT = 9400
# Discovery is a watch and the scrape interval is 5 s: a new pod's series shows up within seconds. 120 s bounds a
# loaded machine.
SCRAPE_TIMEOUT_S = 120.0


def rank_labels() -> dict[str, str]:
    """The labels the operator puts on a serving's rank pods (what the PodMonitor and the scrape job select)."""
    serving = K2Serving.model_validate(stored(example("k2serving-debug.yaml")))
    labels: dict[str, str] = group_stateful_set(serving, 0)["spec"]["template"]["metadata"]["labels"]
    return labels


# --- configuration and command line -------------------------------------------------------------------------------


def test_the_config_scrapes_real_node_rank_pods_every_5s_through_the_api_server(tmp_path: Path) -> None:
    layout = lc.Layout(tmp_path)
    rendered = monitoring.config(layout, "https://127.0.0.1:6443")
    assert rendered["global"]["scrape_interval"] == "5s"
    (job,) = rendered["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["api_server"] == "https://127.0.0.1:6443"
    assert sd["tls_config"] == {
        "ca_file": str(tmp_path / "pki" / "ca.crt"),
        "cert_file": str(tmp_path / "pki" / "admin.crt"),
        "key_file": str(tmp_path / "pki" / "admin.key"),
    }
    keeps = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    address = re.compile(keeps["__meta_kubernetes_pod_ip"])
    assert address.fullmatch("10.245.0.17") and not address.fullmatch("10.244.0.17")
    assert not address.fullmatch("10.245.0.1x") and not address.fullmatch("110.245.0.17")
    assert keeps["__meta_kubernetes_pod_container_port_name"] == PortNames.METRICS
    targets = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    assert targets == {"namespace": ["__meta_kubernetes_namespace"], "pod": ["__meta_kubernetes_pod_name"]}


def test_the_in_cluster_job_of_kind_selects_the_same_pods_through_the_pods_service_account() -> None:
    from localcluster import prometheus

    local = prometheus.rank_scrape_config("https://127.0.0.1:6443", Path("ca"), Path("c"), Path("k"), ("a",))
    in_cluster = prometheus.in_cluster_scrape_config(("a",))
    assert in_cluster["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["a"]}}]
    assert {k: v for k, v in in_cluster.items() if k != "kubernetes_sd_configs"} == {
        k: v for k, v in local.items() if k != "kubernetes_sd_configs"
    }


def test_the_command_line_listens_on_loopback_only_and_keeps_its_files_in_its_home(tmp_path: Path) -> None:
    files = monitoring.PrometheusFiles(tmp_path / "prom", tmp_path / "prom.log")
    argv = monitoring.argv(Path("/opt/prometheus"), files, 19090)
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in argv[1:])
    assert argv[0] == "/opt/prometheus"
    assert flags["web.listen-address"] == "127.0.0.1:19090"
    assert flags["config.file"] == str(tmp_path / "prom" / "prometheus.yml")
    assert flags["storage.tsdb.path"] == str(tmp_path / "prom" / "data")
    assert flags["storage.tsdb.retention.time"] == monitoring.RETENTION
    assert files.owner().root == tmp_path / "prom"  # `stop` recognises it by its home in the command line


def test_pods_reach_it_at_the_gateway_rewritten_to_loopback() -> None:
    rule = " ".join(network.gateway_dnat(19090))
    assert rule == "-i k2br0 -d 10.245.0.1/32 -p tcp --dport 19090 -j DNAT --to-destination 127.0.0.1:19090"


def test_the_state_names_both_urls_only_when_the_cluster_runs_prometheus() -> None:
    with_it = lc.State(ports={"apiserver": 6443, "prometheus": 19090}, real_node=True)
    assert with_it.prometheus_url == "http://127.0.0.1:19090"
    assert with_it.prometheus_pod_url == "http://10.245.0.1:19090"
    assert "prometheus" in cluster.components(with_it)
    before = lc.State(ports={"apiserver": 6443}, real_node=True)
    assert before.prometheus_url is None and before.prometheus_pod_url is None
    assert "prometheus" not in cluster.components(before)  # an older cluster stays healthy without it


def test_a_missing_binary_names_make_tools(tmp_path: Path) -> None:
    files = monitoring.PrometheusFiles(tmp_path / "prom", tmp_path / "prom.log")
    with pytest.raises(lc.ClusterError, match="make tools"):
        monitoring.start(lc.Layout(tmp_path), "https://127.0.0.1:1", files, 1, tmp_path / "no-tools", False)
    assert not files.config.exists()


@pytest.mark.prometheus
def test_the_cluster_records_its_prometheus_and_down_stops_it(tmp_path: Path) -> None:
    if not (TOOLS_BIN / monitoring.PROGRAM).is_file():
        skip_or_fail(f"{TOOLS_BIN / monitoring.PROGRAM} is missing: run `make tools`")
    layout = lc.Layout(tmp_path / "cluster")
    layout.logs.mkdir(parents=True)
    lc.make_pki(layout.pki)
    state = lc.State(ports={"apiserver": free_port()})  # nothing answers there: discovery retries, Prometheus serves
    state.save(layout)
    cluster.start_prometheus(layout, state, TOOLS_BIN)
    recorded = lc.State.load(layout)
    assert recorded is not None and recorded.prometheus_url == state.prometheus_url is not None
    assert api.get(f"{recorded.prometheus_url}/-/ready")[0] == 200
    status, body = api.get(f"{recorded.prometheus_url}/api/v1/status/config")
    assert status == 200 and "kubernetes_sd_configs" in json.loads(body)["data"]["yaml"]
    assert cluster.leftover_pids(layout) == [recorded.pids[monitoring.PROGRAM]]
    assert (layout.prometheus / "data").is_dir() and layout.log(monitoring.PROGRAM).is_file()
    lc.down(layout.root)
    assert not cluster.leftover_pids(layout) and not layout.root.exists()


# --- live, on the real node ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prometheus:
    cluster: Cluster
    url: str  # from this machine
    pod_url: str  # from the real node's pods

    def query(self, promql: str) -> list[dict[str, Any]]:
        status, body = api.get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert status == 200, body
        result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
        return result

    def targets(self) -> dict[str, Any]:
        status, body = api.get(f"{self.url}/api/v1/targets")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)["data"]
        return data


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    if has_real_node(cluster):
        yield from _prometheus_of(cluster, tmp_path_factory.mktemp("prometheus"))
        return
    skip_unless_a_real_node_can_run()
    with real_node_cluster() as (own, _):
        yield from _prometheus_of(own, tmp_path_factory.mktemp("prometheus"))


def _prometheus_of(cluster_: Cluster, home: Path) -> Iterator[Prometheus]:
    """The cluster's recorded Prometheus, or one of our own in `home` (stopped at the end)."""
    layout = lc.Layout(cluster_.kubeconfig.parent.resolve())
    state = lc.State.load(layout)
    assert state is not None, f"no state.json in {layout.root}"
    if state.prometheus_url and state.prometheus_pod_url:
        yield from _with_pods(Prometheus(cluster_, state.prometheus_url, state.prometheus_pod_url))
        return
    if not (TOOLS_BIN / monitoring.PROGRAM).is_file():
        skip_or_fail(f"{TOOLS_BIN / monitoring.PROGRAM} is missing: run `make tools`")
    files, port = monitoring.PrometheusFiles(home, home / "prometheus.log"), free_port()
    process = monitoring.start(layout, state.server, files, port, TOOLS_BIN, on_gateway=True)
    try:
        yield from _with_pods(Prometheus(cluster_, f"http://127.0.0.1:{port}", f"http://{network.GATEWAY}:{port}"))
    finally:
        monitoring.stop(process.pid, files, port, on_gateway=True)
        assert process.poll() is not None
        assert not files.owner().live_pids()


def _metrics_server(name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    """A toolbox pod serving a static /metrics (one sample of `k2_local_probe`) on a container port named metrics."""
    sample = f'k2_local_probe{{probe=\\"{PROBE}\\"}} 1'
    pod = toolbox_pod(
        name,
        f'mkdir -p /tmp/www && echo "{sample}" > /tmp/www/metrics && exec httpd -f -p {METRICS_PORT} -h /tmp/www',
        labels=labels,
        terminationGracePeriodSeconds=1,
        **spec,
    )
    pod["spec"]["containers"][0]["ports"] = [{"name": PortNames.METRICS, "containerPort": METRICS_PORT}]
    return pod


def _with_pods(prometheus: Prometheus) -> Iterator[Prometheus]:
    """The namespace NS with a labelled metrics pod, an unlabelled one, a labelled one on a kwok node, a client."""
    kube = prometheus.cluster
    kube.kubectl("create", "namespace", NS)
    try:
        wait_for("the namespace's ServiceAccount", lambda: exists(kube, "serviceaccount/default", namespace=NS))
        apply(kube, _metrics_server("unlabelled", {"app": "not-a-rank"}), namespace=NS)
        on_kwok = _metrics_server("on-kwok", rank_labels())
        on_kwok["spec"]["nodeSelector"] = {"type": "kwok"}
        apply(kube, on_kwok, namespace=NS)
        apply(kube, toolbox_pod("client", "exec sleep 3600", terminationGracePeriodSeconds=1), namespace=NS)
        apply(kube, _metrics_server("ranked", rank_labels()), namespace=NS)
        pods = ("pod/ranked", "pod/unlabelled", "pod/on-kwok", "pod/client")
        kube.kubectl("wait", "-n", NS, "--for=condition=Ready", *pods, "--timeout=120s")
        yield prometheus
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def _probe_series(prometheus: Prometheus) -> list[dict[str, Any]]:
    return prometheus.query(f'k2_local_probe{{probe="{PROBE}"}}')


@pytest.mark.integration
def test_a_rank_pod_on_the_real_node_is_scraped_with_namespace_and_pod(prometheus: Prometheus) -> None:
    series = wait_for("the rank pod's series", lambda: _probe_series(prometheus), SCRAPE_TIMEOUT_S)
    (sample,) = series
    assert sample["metric"]["namespace"] == NS
    assert sample["metric"]["pod"] == "ranked"
    assert sample["metric"]["job"] == "k2-ranks"
    pod_ip = get(prometheus.cluster, "pod/ranked", namespace=NS)["status"]["podIP"]
    assert sample["metric"]["instance"] == f"{pod_ip}:{METRICS_PORT}"
    assert sample["value"][1] == "1"


@pytest.mark.integration
def test_pods_without_the_rank_labels_or_off_the_real_node_are_discovered_but_not_scraped(
    prometheus: Prometheus,
) -> None:
    wait_for("the rank pod's series", lambda: _probe_series(prometheus), SCRAPE_TIMEOUT_S)

    def pods(kind: str, labels: str, namespace: str, pod: str) -> set[str]:
        targets = [t[labels] for t in prometheus.targets()[kind]]
        return {t[pod] for t in targets if t.get(namespace) == NS}

    def dropped_pods() -> set[str] | None:
        found = pods("droppedTargets", "discoveredLabels", "__meta_kubernetes_namespace", "__meta_kubernetes_pod_name")
        return found if {"unlabelled", "on-kwok"} <= found else None

    dropped = wait_for("the two pods among the dropped targets", dropped_pods)
    assert "ranked" not in dropped
    assert pods("activeTargets", "labels", "namespace", "pod") == {"ranked"}
    assert {s["metric"]["pod"] for s in _probe_series(prometheus)} == {"ranked"}


@pytest.mark.integration
def test_a_pod_on_the_real_node_queries_prometheus_at_the_pod_url(prometheus: Prometheus) -> None:
    wait_for("the rank pod's series", lambda: _probe_series(prometheus), SCRAPE_TIMEOUT_S)
    host_port = prometheus.pod_url.removeprefix("http://")
    assert host_port.startswith(f"{network.GATEWAY}:")
    query = urllib.parse.urlencode({"query": f'k2_local_probe{{probe="{PROBE}"}}'})
    # busybox wget, not `printf | nc`: nc half-closes the connection once its stdin ends, and Prometheus cancels a
    # query whose client went away (HTTP 499, seen under load).
    url = f"{prometheus.pod_url}/api/v1/query?{query}"
    body = prometheus.cluster.kubectl("exec", "-n", NS, "client", "--", "wget", "-q", "-O", "-", url).stdout
    (sample,) = json.loads(body)["data"]["result"]
    assert sample["metric"]["pod"] == "ranked" and sample["metric"]["namespace"] == NS
