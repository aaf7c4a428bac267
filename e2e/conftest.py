"""`e2e_cluster`: the cluster of K2_E2E_KUBECONFIG (any conformant cluster with the K2 CRDs appliable), else the
local control plane of the `cluster` fixture (tests/support/fixtures.py, registered by the repository's conftest)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, crd_files, install_crds, make_cluster, server_of


@pytest.fixture(scope="session")
def e2e_cluster(request: pytest.FixtureRequest) -> Cluster:
    path = os.environ.get("K2_E2E_KUBECONFIG")
    if not path:
        local: Cluster = request.getfixturevalue("cluster")
        return local
    return make_cluster(Path(path), server_of(Path(path)))


@pytest.fixture
def e2e_namespace(e2e_cluster: Cluster) -> Iterator[str]:
    name = f"k2-e2e-{uuid.uuid4().hex[:8]}"
    e2e_cluster.kubectl("create", "namespace", name)
    yield name
    e2e_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def e2e_crds(e2e_cluster: Cluster) -> None:
    install_crds(e2e_cluster, crd_files())
