"""The kustomize base (deploy/kustomize): rendered from the chart, built by the real `kustomize` binary into the CRDs,
the operator and the EPLB controller, valid for kubeconform -strict and a server-side dry-run, like the chart."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.operator import schemas
from tests.operator.test_chart import tool
from tests.support.cluster import Cluster
from tests.support.paths import ROOT

KUSTOMIZE = ROOT / "deploy" / "kustomize"
BASE = KUSTOMIZE / "base"
OVERLAY = KUSTOMIZE / "overlays" / "example"
CRDS = sorted((ROOT / "crds").glob("*.k2.ai.yaml"))


def render_base() -> ModuleType:
    name = "k2_render_base"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, KUSTOMIZE / "render_base.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def build(directory: Path) -> list[dict[str, Any]]:
    argv = [tool("kustomize"), "build", str(directory)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def test_base_is_the_chart_rendered() -> None:
    for name, text in render_base().files().items():
        assert (BASE / name).read_text() == text, f"{BASE / name} drifted: run `python deploy/kustomize/render_base.py`"


def test_base_builds_the_crds_the_operator_and_the_eplb_controller() -> None:
    documents = build(BASE)
    generated = [yaml.safe_load(path.read_text()) for path in CRDS]
    assert list(by_kind(documents, "CustomResourceDefinition").values()) == generated
    assert set(by_kind(documents, "Deployment")) == {"k2-k2-operator", "k2-k2-operator-eplb"}
    operator = by_kind(documents, "Deployment")["k2-k2-operator"]["spec"]["template"]["spec"]["containers"][0]
    eplb = by_kind(documents, "Deployment")["k2-k2-operator-eplb"]["spec"]["template"]["spec"]["containers"][0]
    assert operator["command"][:3] == ["k2", "operator", "run"] and eplb["command"][:3] == ["k2", "eplb", "run"]
    assert {"k2-k2-operator", "k2-k2-operator-eplb"} <= set(by_kind(documents, "ClusterRole"))
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for document in documents:
        labels = document["metadata"].get("labels", {})
        assert "helm.sh/chart" not in labels and labels.get("app.kubernetes.io/managed-by") != "Helm"
        if document["kind"] not in cluster_scoped:
            assert document["metadata"]["namespace"] == "k2-system", document["metadata"]["name"]


def test_overlay_moves_everything_to_its_namespace_and_pins_the_image() -> None:
    documents = build(OVERLAY)
    assert set(by_kind(documents, "Namespace")) == {"k2-ops"}
    assert "k2-system" not in json.dumps(documents)  # bindings' subjects and the operator's arguments too
    images = {
        c["image"]
        for d in by_kind(documents, "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"ghcr.io/k2-operator/operator:0.1.0-example"}
    args = by_kind(documents, "Deployment")["k2-k2-operator"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--monitoring-namespace=k2-ops" in args


@pytest.mark.integration
def test_base_passes_kubeconform_strict(cluster: Cluster, tmp_path: Path) -> None:
    """Built-in kinds against schemas from the local apiserver's /openapi/v2, ours against schemas from crds/."""
    documents = [d for d in build(BASE) if d["kind"] != "CustomResourceDefinition"]
    kinds = {(d["apiVersion"].rpartition("/")[0], d["apiVersion"].rpartition("/")[2], d["kind"]) for d in documents}
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2").stdout)
    made = schemas.from_openapi_v2(openapi, kinds)
    assert len(made) == len(kinds), f"no schema for {kinds}"
    for crd in CRDS:
        made.update(schemas.from_crd(yaml.safe_load(crd.read_text())))
    schemas.write(made, tmp_path / "schemas")
    manifest = tmp_path / "base.yaml"
    manifest.write_text("\n---\n".join(yaml.safe_dump(d) for d in documents))
    location = f"{tmp_path / 'schemas'}/{schemas.SCHEMA_LOCATION}"
    argv = [tool("kubeconform"), "-strict", "-summary", "-schema-location", location, str(manifest)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Valid: {len(documents)}, Invalid: 0, Errors: 0, Skipped: 0" in result.stdout

    manifest.write_text(manifest.read_text().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem", 1))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, "a misspelt field must fail -strict"


@pytest.mark.integration
def test_base_passes_a_server_side_dry_run(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    """In the test's namespace, through an overlay like the example one."""
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "resources": [os.path.relpath(BASE, tmp_path)],  # kustomize refuses absolute paths
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    documents = build(tmp_path)
    text = "---\n".join(yaml.safe_dump(d) for d in documents)
    argv = ["apply", "--server-side", "--force-conflicts", "--field-manager=k2-tests", "--dry-run=server", "-f", "-"]
    result = cluster.kubectl(*argv, input=text)
    applied = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(documents), result.stdout
    assert "deployment.apps/k2-k2-operator-eplb serverside-applied (server dry run)" in applied
