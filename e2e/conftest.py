"""`e2e_cluster`: the cluster of K2_E2E_KUBECONFIG (any conformant cluster with the K2 CRDs appliable), else the
local control plane of tests/conftest.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Cluster, _make_cluster, cluster  # noqa: F401 - `cluster` is a fixture


@pytest.fixture(scope="session")
def e2e_cluster(request: pytest.FixtureRequest) -> Cluster:
    path = os.environ.get("K2_E2E_KUBECONFIG")
    if not path:
        local: Cluster = request.getfixturevalue("cluster")
        return local
    config = yaml.safe_load(Path(path).read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    server = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])["cluster"]["server"]
    return _make_cluster(Path(path), server)


@pytest.fixture
def e2e_namespace(e2e_cluster: Cluster) -> Iterator[str]:
    name = f"k2-e2e-{uuid.uuid4().hex[:8]}"
    e2e_cluster.kubectl("create", "namespace", name)
    yield name
    e2e_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def e2e_crds(e2e_cluster: Cluster) -> None:
    files = sorted((ROOT / "crds").glob("*.k2.ai.yaml"))
    e2e_cluster.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files))
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    e2e_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
