"""The Argo CD health checks (charts/k2-operator/health/k2.ai/<Kind>/health.lua) run by a real Lua interpreter
(lupa's Lua 5.1, the dialect of Argo CD's gopher-lua, and Lua 5.4): on every case of each kind's health_test.yaml
(Argo CD's own layout), and on objects the real reconciles write in each state (tests/operator/health_objects.py)."""

from __future__ import annotations

import importlib
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_api import ExpertPlacement, K2Serving, K2Training
from tests.operator.harness import running_operator
from tests.operator.health_objects import CASES, HEALTH, case_path
from tests.operator.resources import kwok_example
from tests.operator.test_chart import CHART, documents, helm, render
from tests.support.cluster import Cluster
from tests.support.kube import apply, get, items, patch
from tests.support.waits import wait_for

KINDS = (K2Training.KIND, K2Serving.KIND, ExpertPlacement.KIND)
LUA_VERSIONS = ("lua51", "lua54")
STATES = {"Healthy", "Progressing", "Degraded", "Suspended"}


def health(kind: str, obj: dict[str, Any], lua_version: str = "lua51") -> dict[str, str]:
    """What Argo CD would report: run `kind`'s health.lua with `obj` as the global `obj`, return its table."""
    runtime = importlib.import_module(f"lupa.{lua_version}").LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute((HEALTH / kind / "health.lua").read_text())
    assert result is not None, f"{kind}/health.lua returned nothing"
    return {key: str(result[key]) for key in ("status", "message")}


def listed_cases(kind: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load((HEALTH / kind / "health_test.yaml").read_text())["tests"])


FILE_CASES = [(kind, case) for kind in KINDS for case in listed_cases(kind)]


@pytest.mark.parametrize("lua_version", LUA_VERSIONS)
@pytest.mark.parametrize(("kind", "case"), FILE_CASES, ids=[f"{k}-{Path(c['inputPath']).stem}" for k, c in FILE_CASES])
def test_health_test_yaml_case(kind: str, case: dict[str, Any], lua_version: str) -> None:
    obj = yaml.safe_load((HEALTH / kind / case["inputPath"]).read_text())
    assert health(kind, obj, lua_version) == case["healthStatus"]


@pytest.mark.parametrize(("kind", "case"), list(CASES), ids=[f"{k}-{c}" for k, c in CASES])
def test_health_of_what_the_operator_writes(kind: str, case: str) -> None:
    build, status, message = CASES[(kind, case)]
    obj = build()
    assert obj["kind"] == kind
    verdict = health(kind, obj)
    assert verdict["status"] == status, verdict
    assert message in verdict["message"], verdict


@pytest.mark.parametrize("kind", KINDS)
def test_every_state_is_covered_by_the_operator_cases_and_listed(kind: str) -> None:
    covered = {status for (k, _), (_, status, _) in CASES.items() if k == kind}
    assert covered == STATES
    listed = {case["inputPath"]: case["healthStatus"]["status"] for case in listed_cases(kind)}
    for (k, name), (_, status, _) in CASES.items():
        if k == kind:
            path = case_path(kind, name)
            assert path.is_file(), f"run `python -m tests.operator.health_objects` to write {path}"
            assert listed.get(f"testdata/{path.name}") == status, f"{path.name} missing from health_test.yaml"


def test_a_missing_status_and_empty_conditions_are_progressing() -> None:
    for kind in KINDS:
        obj = {"kind": kind, "metadata": {"name": "x", "generation": 3}, "spec": {}}
        assert health(kind, obj)["status"] == "Progressing"
        obj["status"] = {"observedGeneration": 3, "conditions": []}
        assert health(kind, obj)["status"] == "Progressing", kind


def test_the_chart_renders_the_argocd_cm_keys_only_when_enabled() -> None:
    assert all(d["kind"] != "ConfigMap" for d in documents(render()))
    enabled = [
        d for d in documents(render("k2-system", "k2", "argocd.healthChecks.enabled=true")) if d["kind"] == "ConfigMap"
    ]
    (config,) = enabled
    assert (config["metadata"]["name"], config["metadata"]["namespace"]) == ("argocd-cm", "argocd")
    expected = {
        f"resource.customizations.health.k2.ai_{kind}": (HEALTH / kind / "health.lua").read_text() for kind in KINDS
    }
    assert config["data"] == expected  # byte for byte, so the verdicts tested above are Argo CD's
    bad = helm("template", "k2", str(CHART), "--set", "argocd.healthChecks.namespaces=argocd", check=False)
    assert bad.returncode != 0 and "values don't meet the specifications of the schema" in bad.stderr


def test_the_packaged_chart_leaves_the_test_cases_out(tmp_path: Path) -> None:
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("k2-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "k2-operator/health/k2.ai/K2Serving/health.lua" in names
    assert not [n for n in names if "/testdata/" in n or n.endswith("health_test.yaml")]


# --- on the local control plane, with the operator running -------------------------------------------------------


def wait_for_health(cluster: Cluster, ref: str, namespace: str, status: str, message: str = "") -> dict[str, str]:
    """Polls the resource until its health.lua verdict is `status` with `message` in its message."""
    kind = {"k2training": K2Training.KIND, "k2serving": K2Serving.KIND, "expertplacement": ExpertPlacement.KIND}
    script_kind = kind[ref.partition("/")[0]]

    def verdict() -> dict[str, str] | None:
        found = health(script_kind, get(cluster, ref, namespace=namespace))
        return found if found["status"] == status and message in found["message"] else None

    return wait_for(f"{ref} {status} ({message})", verdict, 90)


def annotate_pods(cluster: Cluster, namespace: str, selector: str, annotation: str) -> None:
    for pod in items(cluster, "pods", namespace=namespace, selector=selector):
        name = pod["metadata"]["name"]
        cluster.kubectl("annotate", "-n", namespace, f"pod/{name}", annotation, "--overwrite")


@pytest.mark.integration
def test_health_of_the_kinds_through_the_real_operator(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    """Create, run, suspend, fail and succeed on the real control plane: every verdict is read from what the
    operator wrote there."""
    serving, training, failing = "k2-debug-serve", "k2-debug-train", "k2-health-fail"
    long_run = {"k2.ai/fake-run-duration": "600s"}
    ranks = f"app.kubernetes.io/instance={serving},app.kubernetes.io/component=rank"
    with running_operator(cluster, namespace, tmp_path) as operator:
        apply(cluster, kwok_example("k2serving-debug.yaml"), namespace=namespace)
        body = kwok_example("k2training-debug.yaml")
        body["metadata"]["annotations"] = long_run
        apply(cluster, body, namespace=namespace)
        body = kwok_example("k2training-debug.yaml")
        body["metadata"].update(name=failing, annotations=long_run)
        body["spec"]["failurePolicy"] = {"maxRestarts": 0}
        apply(cluster, body, namespace=namespace)

        wait_for_health(cluster, f"k2serving/{serving}", namespace, "Healthy", "Available: 2/2 groups ready")
        wait_for_health(cluster, f"k2training/{training}", namespace, "Healthy", "Running: 2/2 workers ready")
        wait_for_health(cluster, f"expertplacement/{serving}", namespace, "Progressing", "Applying: 0/4 ranks")
        annotate_pods(cluster, namespace, ranks, "k2.ai/applied-placement-generation=1")
        wait_for_health(cluster, f"expertplacement/{serving}", namespace, "Healthy", "Applied: 4/4 ranks")

        patch(cluster, f"k2serving/{serving}", {"spec": {"suspend": True}}, namespace=namespace)
        wait_for_health(cluster, f"k2serving/{serving}", namespace, "Suspended", "spec.suspend is true")
        wait_for_health(cluster, f"expertplacement/{serving}", namespace, "Suspended", "suspended")
        patch(cluster, f"k2serving/{serving}", {"spec": {"suspend": False}}, namespace=namespace)
        wait_for_health(cluster, f"k2serving/{serving}", namespace, "Healthy", "Available: 2/2 groups ready")
        # An invalid generation is Degraded, though the ranks still serve the previous one.
        placement = get(cluster, f"expertplacement/{serving}", namespace=namespace)
        layers = placement["spec"]["layers"]
        layers[0]["slots"] = [[0] * len(row) for row in layers[0]["slots"]]  # experts 1..7 lose every replica
        patch(cluster, f"expertplacement/{serving}", {"spec": {"generation": 2, "layers": layers}}, namespace=namespace)
        wait_for_health(cluster, f"expertplacement/{serving}", namespace, "Degraded", "experts without a replica")

        wait_for_health(cluster, f"k2training/{failing}", namespace, "Healthy", "Running")
        annotate_pods(cluster, namespace, f"app.kubernetes.io/instance={failing}", "k2.ai/fake-fail=1")
        wait_for_health(cluster, f"k2training/{failing}", namespace, "Degraded", "maxRestarts=0 reached")

        patch(cluster, f"k2training/{training}", {"spec": {"suspend": True}}, namespace=namespace)
        wait_for_health(cluster, f"k2training/{training}", namespace, "Suspended", "spec.suspend is true")
        patch(cluster, f"k2training/{training}", {"spec": {"suspend": False}}, namespace=namespace)
        wait_for_health(cluster, f"k2training/{training}", namespace, "Healthy", "Running")
        annotate_pods(cluster, namespace, f"app.kubernetes.io/instance={training}", "k2.ai/fake-run-duration=1s")
        wait_for_health(cluster, f"k2training/{training}", namespace, "Healthy", "Succeeded")

        assert operator.errors() == [], operator.logs()
