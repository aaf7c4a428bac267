"""The Helm chart: CRDs in sync with crds/, lint, values schema, kubeconform -strict with offline schemas, a
server-side dry-run install, and the operator reconciling with nothing but the chart's RBAC."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator import schemas
from tests.operator.harness import running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, exists, has_condition, items
from tests.support.paths import ROOT, TOOLS_BIN
from tests.support.waits import wait_for

CHART = ROOT / "charts" / "k2-operator"


def tool(name: str) -> str:
    path = TOOLS_BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not built in {TOOLS_BIN}: run `make tools`")
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
        render("k2-system", "k2", "metrics.serviceMonitor.enabled=true", "watchNamespaces={team-a,team-b}")
    )
    assert [d["kind"] for d in scoped].count("ServiceMonitor") == 1
    roles = [d for d in scoped if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    deployment = next(d for d in scoped if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


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
    result = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=render(namespace, "k2"))
    created = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(created) == len(documents(render(namespace, "k2"))), result.stdout


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
        account = next(d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount")
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
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false", input=text, check=False)
