"""The Helm chart: CRDs in sync with crds/, lint, values schema, kubeconform -strict with offline schemas, a
server-side dry-run install, and the operator reconciling with nothing but the chart's RBAC."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_api import K2Serving
from k2_api.contract import PortNames
from k2_operator.builders.serving import frontend_deployment, group_stateful_set
from tests.operator import schemas
from tests.operator.harness import running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, exists, has_condition, items
from tests.support.paths import ROOT, TOOLS_BIN
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

CHART = ROOT / "charts" / "k2-operator"


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.is_file():
        skip_or_fail(f"{name} is not built in {TOOLS_BIN}: run `make tools`")
    return str(path)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=check, timeout=120)


def render(namespace: str = "k2-system", release: str = "k2", *values: str) -> str:
    args = ["template", release, str(CHART), "--namespace", namespace, "--include-crds"]
    for value in values:
        args += ["--set", value]
    return helm(*args).stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_chart_crds_are_the_generated_ones() -> None:
    generated = sorted((ROOT / "crds").glob("*.k2.ai.yaml"))
    copied = sorted((CHART / "crds").glob("*.yaml"))
    assert [p.name for p in copied] == [p.name for p in generated], "run `make chart-crds`"
    for source, copy in zip(generated, copied, strict=True):
        assert copy.read_text() == source.read_text(), f"{copy} drifted from {source}: run `make chart-crds`"


def test_helm_lint_strict() -> None:
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_rejects_bad_values() -> None:
    for bad in ("image.pullPolicy=Sometimes", "metrics.port=0", "watchNamespaces[0]=Bad_Name", "unknownKey=1"):
        result = helm("template", "k2", str(CHART), "--set", bad, check=False)
        assert result.returncode != 0, f"{bad} was accepted"
        assert "values don't meet the specifications of the schema" in result.stderr


def test_operator_pod_is_hardened_and_probed() -> None:
    deployment = next(d for d in documents(render()) if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"


def test_service_monitor_is_optional_and_namespaces_restrict_rbac() -> None:
    kinds = [d["kind"] for d in documents(render())]
    assert "ServiceMonitor" not in kinds and "ClusterRoleBinding" in kinds
    scoped = documents(
        render(
            "k2-system",
            "k2",
            "metrics.serviceMonitor.enabled=true",
            "watchNamespaces={team-a,team-b}",
            "eplb.enabled=false",
        )
    )
    assert [d["kind"] for d in scoped].count("ServiceMonitor") == 1
    roles = [d for d in scoped if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    deployment = next(d for d in scoped if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


EPLB_RULES = {
    ("k2.ai", "k2servings", ("list",)),
    ("k2.ai", "expertplacements", ("get", "patch")),
    ("k2.ai", "expertplacements/status", ("patch",)),
    ("", "events", ("create",)),
    ("", "pods", ("list",)),
}
"""What k2_eplb.kube calls through the adapter: list servings, get and apply placements and their status, post
Events, list rank pods for direct scraping. Nothing else (no watch, no create, no delete, no secrets)."""


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (group, resource, tuple(sorted(rule["verbs"])))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def eplb_documents(*values: str) -> list[dict[str, Any]]:
    return [d for d in documents(render("k2-system", "k2", *values)) if "-eplb" in d["metadata"]["name"]]


def test_eplb_controller_rbac_is_exactly_what_it_calls() -> None:
    cluster_wide = {d["kind"]: d for d in eplb_documents()}
    assert rules_of(cluster_wide["ClusterRole"]) == EPLB_RULES
    binding = cluster_wide["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == cluster_wide["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "k2-k2-operator-eplb", "namespace": "k2-system"}]
    scoped = {d["kind"]: d for d in eplb_documents("watchNamespaces={team-a}")}
    assert "ClusterRole" not in scoped and scoped["Role"]["metadata"]["namespace"] == "team-a"
    assert rules_of(scoped["Role"]) == EPLB_RULES
    args = scoped["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args


def test_eplb_controller_deployment_runs_the_controller_hardened_and_probed() -> None:
    values = ("eplb.interval=5", "eplb.prometheusUrl=http://prom.monitoring:9090", "eplb.metrics.port=9191")
    docs = {d["kind"]: d for d in eplb_documents(*values, "eplb.allowedPrometheusUrls={http://a:9090/,http://b/}")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert container["command"] == ["k2", "eplb", "run"]
    assert container["args"] == [
        "--interval=5",
        "--metrics-port=9191",
        "--healthz-intervals=10",
        "--prometheus-url=http://prom.monitoring:9090",
        "--allowed-prometheus-url=http://a:9090/",
        "--allowed-prometheus-url=http://b/",
    ]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9191, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    service = docs["Service"]
    assert service["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 9191
    operator = next(
        d for d in documents(render()) if d["kind"] == "Deployment" and "-eplb" not in d["metadata"]["name"]
    )
    operator_selector = operator["spec"]["selector"]["matchLabels"]
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not operator_selector.items() <= pod_labels.items(), "the operator's selector must not match EPLB pods"


def test_eplb_controller_is_optional_and_refuses_several_namespaces() -> None:
    assert eplb_documents("eplb.enabled=false") == []
    result = helm("template", "k2", str(CHART), "--set", "watchNamespaces={a,b}", check=False)
    assert result.returncode != 0 and "at most one watchNamespaces entry" in result.stderr
    for bad in ("eplb.interval=0", "eplb.metrics.port=70000", "eplb.prometheusUrl=prom:9090", "eplb.extra=1"):
        result = helm("template", "k2", str(CHART), "--set", bad, check=False)
        assert result.returncode != 0, f"{bad} was accepted"


def operator_args(*values: str) -> list[str]:
    deployment = next(
        d
        for d in documents(render("k2-system", "k2", *values))
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "k2-k2-operator"
    )
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


def test_operator_manages_network_policies_for_the_monitoring_namespaces() -> None:
    role = next(
        d for d in documents(render()) if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "k2-k2-operator"
    )
    assert ("networking.k8s.io", "networkpolicies", ("create", "delete", "list", "patch")) in rules_of(role)
    flags = [a for a in operator_args() if a.startswith("--monitoring-namespace=")]
    assert flags == ["--monitoring-namespace=monitoring", "--monitoring-namespace=k2-system"]  # EPLB scrapes directly
    with_prometheus = operator_args(
        "eplb.prometheusUrl=http://prom.obs:9090", "networkPolicy.monitoringNamespaces={obs}"
    )
    assert [a for a in with_prometheus if a.startswith("--monitoring-namespace=")] == ["--monitoring-namespace=obs"]


def test_pod_monitor_selects_the_rank_pods_metrics_port() -> None:
    assert "PodMonitor" not in [d["kind"] for d in documents(render())]
    (monitor,) = [
        d
        for d in documents(render("k2-system", "k2", "monitoring.podMonitor.enabled=true"))
        if d["kind"] == "PodMonitor"
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": PortNames.METRICS, "path": "/metrics", "interval": "15s"}
    ]
    serving = K2Serving.model_validate(
        kwok_example("k2serving-debug.yaml") | {"metadata": {"name": "s", "namespace": "n", "uid": "u"}}
    )
    rank_pod_labels = group_stateful_set(serving, 0)["spec"]["template"]["metadata"]["labels"]
    frontend_labels = frontend_deployment(serving)["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= rank_pod_labels.items()
    assert not selector.items() <= frontend_labels.items()
    scoped = documents(render("k2-system", "k2", "monitoring.podMonitor.enabled=true", "watchNamespaces={team-a}"))
    assert next(d for d in scoped if d["kind"] == "PodMonitor")["spec"]["namespaceSelector"] == {
        "matchNames": ["team-a"]
    }


@pytest.mark.integration
def test_template_passes_kubeconform_strict(cluster: Cluster, tmp_path: Path) -> None:
    """Built-in kinds are checked against schemas made from the local apiserver's /openapi/v2, our kinds against
    schemas made from crds/; no schema is fetched from the internet and none is skipped."""
    rendered = render("k2-system", "k2", "watchNamespaces={team-a}") + "---\n" + render()
    examples = [str(p) for p in sorted((ROOT / "examples").glob("*.yaml"))]
    kinds = {
        (d["apiVersion"].rpartition("/")[0], d["apiVersion"].rpartition("/")[2], d["kind"]) for d in documents(rendered)
    }
    kinds -= {("apiextensions.k8s.io", "v1", "CustomResourceDefinition")}
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2").stdout)
    made = schemas.from_openapi_v2(openapi, kinds)
    assert len(made) == len(kinds), f"no schema for {kinds}"
    for crd in sorted((ROOT / "crds").glob("*.k2.ai.yaml")):
        made.update(schemas.from_crd(yaml.safe_load(crd.read_text())))
    schemas.write(made, tmp_path / "schemas")
    manifest = tmp_path / "chart.yaml"
    manifest.write_text(
        "\n---\n".join(yaml.safe_dump(d) for d in documents(rendered) if d["kind"] != "CustomResourceDefinition")
    )
    location = f"{tmp_path / 'schemas'}/{schemas.SCHEMA_LOCATION}"
    argv = [tool("kubeconform"), "-strict", "-summary", "-schema-location", location, str(manifest), *examples]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Invalid: 0, Errors: 0, Skipped: 0" in result.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text(manifest.read_text().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1))
    result = subprocess.run([*argv[: -len(examples) - 1], str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, "a misspelt field must fail -strict"


@pytest.mark.integration
def test_server_side_dry_run_install(cluster: Cluster, namespace: str, k2_crds: list[str]) -> None:
    for values in ((), (f"watchNamespaces={{{namespace}}}",)):
        text = render(namespace, "k2", *values)
        result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=text)
        created = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(created) == len(documents(text)), result.stdout
        assert "deployment.apps/k2-k2-operator-eplb serverside-applied (server dry run)" in created, result.stdout


def kubeconfig_for_token(cluster: Cluster, token: str, path: Path) -> Path:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    server = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])
    for key in ("certificate-authority",):
        if key in server["cluster"]:
            server["cluster"][key] = str((cluster.kubeconfig.parent / server["cluster"][key]).resolve())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [server],
                "users": [{"name": "chart-sa", "user": {"token": token}}],
                "contexts": [{"name": "chart-sa", "context": {"cluster": server["name"], "user": "chart-sa"}}],
                "current-context": "chart-sa",
            }
        )
    )
    return path


def run_eplb_once_as(
    cluster: Cluster, namespace: str, account: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """One pass of the EPLB controller (`k2 eplb run --once`) authenticated as the chart's EPLB ServiceAccount: it
    lists the servings, reads the placement and writes its status with that RBAC only (with a Prometheus that refuses
    connections, so that the pass ends at once instead of scraping kwok pods for a window)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    kubeconfig = kubeconfig_for_token(cluster, token, tmp_path / "eplb.kubeconfig")
    argv = [sys.executable, "-m", "k2_api.cli", "eplb", "run", "--once", "--namespace", namespace]
    argv += ["--prometheus-url", "http://127.0.0.1:9"]
    return subprocess.run(
        [*argv, "--kubeconfig", str(kubeconfig)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.integration
@pytest.mark.parametrize("scoped", [False, True], ids=["cluster-wide", "watchNamespaces"])
def test_operator_runs_with_only_the_charts_rbac(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path, scoped: bool
) -> None:
    """The operator authenticates as the chart's ServiceAccount (a token for system:serviceaccount:NS:SA) and still
    reconciles both examples completely; any 403 would fail a reconcile and show as an error in its log."""
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    values = [f"watchNamespaces={{{namespace}}}"] if scoped else []
    kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    rbac = [d for d in documents(render(namespace, release, *values)) if d["kind"] in kinds]
    assert any(d["kind"] == "Role" for d in rbac) == scoped
    text = "\n---\n".join(yaml.safe_dump(d) for d in rbac)
    cluster.kubectl("apply", "--server-side", "-f", "-", input=text)
    try:
        accounts = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
        (account,) = [a for a in accounts if not a.endswith("-eplb")]
        (eplb_account,) = [a for a in accounts if a.endswith("-eplb")]
        can = cluster.kubectl(
            "auth",
            "can-i",
            "create",
            "pods",
            f"--as=system:serviceaccount:{namespace}:{account}",
            "-n",
            namespace,
            check=False,
        )
        assert can.stdout.strip() == "no", "the operator must not create pods itself"
        token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
        kubeconfig = kubeconfig_for_token(cluster, token, tmp_path / "sa.kubeconfig")
        with running_operator(cluster, namespace, tmp_path, env={"KUBECONFIG": str(kubeconfig)}) as operator:
            apply(cluster, kwok_example("k2serving-debug.yaml"), namespace=namespace)
            training = kwok_example("k2training-debug.yaml")
            training["metadata"]["annotations"] = {"k2.ai/fake-run-duration": "600s"}
            apply(cluster, training, namespace=namespace)
            wait_for(
                "Available",
                lambda: has_condition(cluster, "k2serving/k2-debug-serve", "Available", namespace=namespace),
                90,
            )
            wait_for(
                "Running",
                lambda: has_condition(cluster, "k2training/k2-debug-train", "Running", namespace=namespace),
                90,
            )
            assert exists(cluster, "configmap/k2-debug-serve-active", namespace=namespace)
            workers = [
                r for r in items(cluster, "roles", namespace=namespace) if r["metadata"]["name"].startswith("k2-debug")
            ]
            assert len(workers) == 2  # the workers' Roles, granted by the operator
            assert operator.errors() == [], operator.logs()
            assert "403" not in operator.logs()
            assert len(items(cluster, "networkpolicies", namespace=namespace)) == 3  # 2 groups and the frontend
            eplb = run_eplb_once_as(cluster, namespace, eplb_account, tmp_path)
            assert eplb.returncode == 0, eplb.stdout + eplb.stderr
            assert "403" not in eplb.stderr and "Forbidden" not in eplb.stderr, eplb.stderr
            placement = cluster.kubectl("get", "expertplacement/k2-debug-serve", "-n", namespace, "-o", "json")
            conditions = json.loads(placement.stdout)["status"]["conditions"]
            # Planned is the controller's alone: its pass got as far as writing status (kwok ranks never report the
            # first generation applied, so it waits: ApplyPending).
            planned = next(c for c in conditions if c["type"] == "Planned")
            assert planned["reason"] == "ApplyPending", (planned, eplb.stderr)
            who = f"--as=system:serviceaccount:{namespace}:{eplb_account}"
            for verb, what, allowed in (
                ("list", "pods", "yes"),
                ("patch", "expertplacements.k2.ai/status", "yes"),
                ("create", "events", "yes"),
                ("create", "pods", "no"),
                ("delete", "expertplacements.k2.ai", "no"),
                ("patch", "k2servings.k2.ai", "no"),
                ("get", "secrets", "no"),
            ):
                can = cluster.kubectl("auth", "can-i", verb, what, who, "-n", namespace, check=False)
                assert can.stdout.strip() == allowed, (verb, what)
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=text, check=False)
