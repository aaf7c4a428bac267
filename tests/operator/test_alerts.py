"""The chart's alerting rules and Grafana dashboard: rendered by Helm, checked and unit-tested by promtool, every
metric they name exported by the code, and every dashboard query run against a real Prometheus scraping the real
metric endpoints of the operator, the EPLB controller, a serving rank and training rank 0."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from k2_api.contract import Metrics
from k2_eplb.controller_metrics import ControllerMetrics, Liveness
from k2_eplb.controller_metrics import serve as serve_eplb_metrics
from k2_eplb.planner import Decision, Reason
from k2_operator import metrics as operator_metrics
from k2_operator.builders.training import job
from k2_workers.serve.metrics import ExpertLoadCollector, serve_metrics
from k2_workers.train.metrics import TrainMetrics
from tests.eplb.prometheus_server import Prometheus, running_prometheus
from tests.operator.resources import training
from tests.operator.test_chart import CHART, documents, helm, render
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

HERE = Path(__file__).parent
DASHBOARD = CHART / "dashboards" / "k2-overview.json"
ON = ("alerts.enabled=true", "grafana.dashboards.enabled=true", "monitoring.trainingPodMonitor.enabled=true")
METRIC = re.compile(r"\bk2_[a-z0-9_]+\b")
NUMBER = re.compile(r"[\w.]+=[0-9]+\.[0-9]+")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-z_]+)\)$")
# Grafana's variables, as the test's Prometheus (1 s scrapes) can answer them.
VARIABLES = {"$__rate_interval": "10s", "$namespace": ".*", "$serving": ".*", "$training": ".*"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is not installed (Debian package `prometheus`)")
    return str(path)


def rendered(*values: str) -> list[dict[str, Any]]:
    """The chart with the alerts, the dashboard and the training PodMonitor on, plus `values` (numbers as JSON:
    `--set` would pass 0.5 as a string)."""
    args = ["template", "k2", str(CHART), "--namespace", "k2-system"]
    for value in (*ON, *values):
        args += ["--set-json" if NUMBER.fullmatch(value) else "--set", value]
    return documents(helm(*args).stdout)


def rule_groups(*values: str) -> list[dict[str, Any]]:
    (rule,) = [d for d in rendered(*values) if d["kind"] == "PrometheusRule"]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def alerts(*values: str) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups(*values) for r in g["rules"]}


def write_rules(directory: Path, *values: str) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups(*values)}, sort_keys=False))
    return path


def dashboard() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return body


def dashboard_queries() -> list[str]:
    """Every panel target's expression and every variable's query (label_values as the PromQL Grafana runs)."""
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, variable["query"]
            queries.append(f"group by ({match[2]}) ({match[1]})")
    return queries


def exposition_names(registry: CollectorRegistry) -> set[str]:
    """The sample names a registry exports (a counter `x`: `x_total`; a histogram: `_bucket`, `_sum`, `_count`)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {f.name + s for f in registry.collect() for s in suffixes.get(f.type, ("",))}


def exported_metrics() -> set[str]:
    rank = CollectorRegistry()
    rank.register(ExpertLoadCollector("s", 0, 0, num_layers=1, num_experts=1, num_slots=1))
    registries = [operator_metrics.REGISTRY, ControllerMetrics().registry, TrainMetrics("t").registry, rank]
    return set().union(*map(exposition_names, registries))


def test_everything_is_off_by_default() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in documents(render())}
    assert ("PrometheusRule", "k2-k2-operator") not in kinds
    assert ("ConfigMap", "k2-k2-operator-dashboards") not in kinds
    assert ("PodMonitor", "k2-k2-operator-training") not in kinds
    on = {(d["kind"], d["metadata"]["name"]) for d in rendered()}
    assert {("PrometheusRule", "k2-k2-operator"), ("ConfigMap", "k2-k2-operator-dashboards")} <= on
    assert ("PodMonitor", "k2-k2-operator-training") in on


def test_the_issue_s_alerts_exist_with_a_severity_and_a_summary() -> None:
    rules = alerts()
    assert set(rules) == {
        "K2OperatorReconcileErrors",
        "K2EplbPlanningErrors",
        "K2EplbPassErrors",
        "K2ExpertPlacementStuck",
        "K2ServingBalancednessLow",
        "K2ServingGroupDegraded",
        "K2TrainingStalled",
    }
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = subprocess.run([promtool(), "check", "rules", str(write_rules(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text((tmp_path / "rules.yaml").read_text().replace("sum by (namespace, serving)", "sum by (", 1))
    result = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0, "a PromQL syntax error must fail promtool"


def run_unit_tests(directory: Path, *values: str) -> subprocess.CompletedProcess[str]:
    write_rules(directory, *values)
    shutil.copy(HERE / "alerts_test.yaml", directory / "alerts_test.yaml")
    argv = [promtool(), "test", "rules", "alerts_test.yaml"]
    return subprocess.run(argv, capture_output=True, text=True, cwd=directory, timeout=60)


def test_each_alert_fires_and_stays_quiet_in_promtool_unit_tests(tmp_path: Path) -> None:
    result = run_unit_tests(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (HERE / "alerts_test.yaml").read_text()))
    assert tested == set(alerts()), "every alert has unit tests"


def test_unit_tests_fail_when_a_threshold_moves(tmp_path: Path) -> None:
    """The unit tests pin the defaults: other values change which alerts fire (so the tests can fail)."""
    result = run_unit_tests(tmp_path, "alerts.balancednessThreshold=0.5", "alerts.trainingStalledFor=10m")
    assert result.returncode != 0
    report = result.stdout + result.stderr
    assert "alertname: K2ServingBalancednessLow" in report and "alertname: K2TrainingStalled" in report


def test_thresholds_and_durations_come_from_values() -> None:
    rules = alerts("alerts.balancednessThreshold=0.65", "alerts.placementStuckFor=45m", "alerts.alertLabels.team=ml")
    assert rules["K2ServingBalancednessLow"]["expr"].endswith("< 0.65")
    assert rules["K2ExpertPlacementStuck"]["for"] == "45m"
    assert "For 45m the ranks" in rules["K2ExpertPlacementStuck"]["annotations"]["description"]
    assert all(r["labels"]["team"] == "ml" for r in rules.values())
    for bad in ("alerts.balancednessThreshold=1.5", "alerts.placementStuckFor=soon", "alerts.unknown=1"):
        flag = "--set-json" if NUMBER.fullmatch(bad) else "--set"
        result = helm("template", "k2", str(CHART), "--set", "alerts.enabled=true", flag, bad, check=False)
        assert result.returncode != 0, f"{bad} was accepted"


def test_every_metric_the_rules_and_dashboard_name_is_exported() -> None:
    exported = exported_metrics()
    assert {spec.name for spec in (Metrics.EXPERT_TOKENS, Metrics.SLOT_TOKENS, Metrics.EXPERT_WEIGHT_BYTES)} <= exported
    expressions = [r["expr"] for g in rule_groups() for r in g["rules"]] + dashboard_queries()
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used - exported == set(), "rename in the rules or the dashboard too"
    # Each component is covered.
    for prefix in ("k2_operator_", "k2_eplb_", "k2_expert_", "k2_slot_", "k2_train_"):
        assert any(name.startswith(prefix) for name in used), prefix
    reasons = {value for expr in expressions for value in re.findall(r'reason!?="(\w+)"', expr)}
    assert reasons <= {r.value for r in Reason}


def test_dashboard_is_a_grafana_dashboard_in_a_sidecar_configmap() -> None:
    values = ("grafana.dashboards.namespace=monitoring", "grafana.dashboards.annotations.grafana_folder=K2")
    (config_map,) = [
        d for d in rendered(*values) if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")
    ]
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "K2"}
    assert json.loads(config_map["data"]["k2-overview.json"]) == dashboard()

    board = dashboard()
    assert board["uid"] == "k2-overview" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        covered = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_training_pod_monitor_selects_rank_0_of_the_operator_s_training_pods() -> None:
    (monitor,) = [d for d in rendered() if d["kind"] == "PodMonitor" and d["metadata"]["name"].endswith("-training")]
    template = job(training(), attempt=0)["spec"]["template"]
    wanted = dict(monitor["spec"]["selector"]["matchLabels"])
    # The Job controller adds the completion index to each pod of an Indexed Job.
    assert wanted.pop("batch.kubernetes.io/job-completion-index") == "0"
    assert wanted.items() <= template["metadata"]["labels"].items()
    (container,) = template["spec"]["containers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container["ports"]}


def test_eplb_service_monitor_keeps_the_controller_s_namespace_label() -> None:
    (monitor,) = [
        d
        for d in documents(render("k2-system", "k2", "metrics.serviceMonitor.enabled=true"))
        if d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("-eplb")
    ]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True


# --- the dashboard's queries on a real Prometheus ---------------------------------------------------------------


@contextlib.contextmanager
def live_endpoints() -> Iterator[list[str]]:
    """Real metric endpoints on 127.0.0.1 kept moving by a thread: the operator's registry, the EPLB controller's,
    a serving rank's and training rank 0's. Yields their scrape targets."""
    eplb = ControllerMetrics()
    rank = CollectorRegistry()
    load = ExpertLoadCollector("chat", 0, 0, num_layers=2, num_experts=4, num_slots=3)
    rank.register(load)
    train = TrainMetrics("pretrain", port=-1, addr="127.0.0.1")
    servers = [
        operator_metrics.serve(0, "127.0.0.1"),
        serve_eplb_metrics(eplb, Liveness(60.0), 0, "127.0.0.1"),
    ]
    rank_server = serve_metrics(rank, 0, "127.0.0.1")
    stop = threading.Event()

    def tick() -> None:
        step = 0
        while not stop.wait(0.2):
            step += 1
            with operator_metrics.observe("K2Serving"):
                pass
            with contextlib.suppress(RuntimeError), operator_metrics.observe("K2Training"):
                raise RuntimeError("a failing reconcile")
            operator_metrics.STATUS_WRITES.labels("K2Serving").inc()
            placement = np.zeros((2, 2, 3), dtype=np.int64)
            moved = Decision(Reason.REBALANCED, "", placement, step, 0.6, 0.9, 0.7, moved_experts=2, moved_bytes=4096)
            eplb.observe("chat", "team-a", moved)
            eplb.observe("chat", "team-a", Decision(Reason.APPLY_PENDING, "", staleness=0.7, measured_balancedness=0.7))
            eplb.errors.labels("chat", "team-a").inc()
            eplb.pass_errors.inc()
            load.add(np.arange(8.0).reshape(2, 4), np.ones((2, 3)))
            load.add_weight_bytes("peer", 1024)
            record = {"step": step, "loss": 3.0 / step, "lr": 0.01, "tokens_per_s": 900.0, "max_attn_logit": 42.0}
            train.observe_step({**record, "clipped_heads": 1, "grad_norm": 0.5}, 256, [[3.0, 1.0]])
            train.observe_checkpoint(step - step % 5)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        ports = [s.server_address[1] for s in servers] + [rank_server.port, train.port]
        yield [f"127.0.0.1:{port}" for port in ports]
    finally:
        stop.set()
        thread.join(timeout=5)
        for server in servers:
            server.shutdown()
            server.server_close()
        rank_server.close()
        train.close()


def substituted(query: str) -> str:
    for variable, value in VARIABLES.items():
        query = query.replace(variable, value)
    return query


def answers(prometheus: Prometheus, query: str) -> bool:
    try:
        return bool(prometheus.query(query))
    except urllib.error.HTTPError as error:  # 400: the query does not parse or evaluate
        raise AssertionError(f"{query}: {error.read().decode()}") from error


@pytest.mark.prometheus
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    queries = sorted({substituted(q) for q in dashboard_queries()})
    with live_endpoints() as targets, running_prometheus(tmp_path / "prometheus") as prometheus:
        prometheus.set_targets(targets, {"namespace": "team-a"})
        pending = list(queries)

        def all_answered() -> bool:
            pending[:] = [q for q in pending if not answers(prometheus, q)]
            return not pending

        try:
            wait_for("data for every dashboard query", all_answered, timeout_s=60)
        except AssertionError as error:
            raise AssertionError(f"{error}; without data: {pending}") from None
        # The alert expressions evaluate there too (data or not: the EPLB ones need minutes of history).
        for rule in (r for g in rule_groups() for r in g["rules"]):
            answers(prometheus, rule["expr"])
        assert prometheus.scalar('count(k2_expert_weight_bytes_total{source="storage"})') == 1.0
        assert prometheus.scalar('max(k2_eplb_balancedness{serving="chat"})') == pytest.approx(0.7)
