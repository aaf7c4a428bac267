"""`e2e_cluster`: the cluster of K2_E2E_KUBECONFIG (any conformant cluster with the K2 CRDs appliable), else the
local control plane of the `cluster` fixture (tests/support/fixtures.py, registered by the repository's conftest)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.real_node import has_real_node
from tests.support.cluster import Cluster, crd_files, install_crds, load_local_cluster, make_cluster, server_of
from tests.support.paths import TOOLS_BIN
from tests.support.prerequisites import skip_or_fail


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


# --- the live loop (e2e/test_live_loop.py): the chart, a K2Serving on pods that run our image, and a Prometheus ---

HACK = Path(__file__).resolve().parents[1] / "hack"
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))  # hack/liveloop: shared with `make demo` and benchmarks/live_loop.py

from liveloop.kubectl import Kubectl  # noqa: E402


@dataclass(frozen=True)
class LiveEnv:
    """Where the live loop runs: a kubectl/helm handle, the nodes to pin pods to, and one Prometheus as seen from
    this process (`prometheus_url`) and from the cluster's pods (`prometheus_pod_url`)."""

    kubectl: Kubectl
    node_selector: dict[str, str]
    prometheus_url: str
    prometheus_pod_url: str


@pytest.fixture(scope="session")
def live_env(e2e_cluster: Cluster, e2e_crds: None) -> LiveEnv:
    """On the local cluster: its real node and its Prometheus (`make cluster-up`). On another cluster (kind):
    K2_E2E_PROMETHEUS_URL and K2_E2E_PROMETHEUS_POD_URL name a Prometheus that scrapes the rank pods, and
    K2_E2E_NODE_SELECTOR (key=value) the nodes that run our image."""
    kubectl = Kubectl(e2e_cluster.kubeconfig, TOOLS_BIN / "kubectl", TOOLS_BIN / "helm")
    if os.environ.get("K2_E2E_KUBECONFIG"):
        host, pod = os.environ.get("K2_E2E_PROMETHEUS_URL"), os.environ.get("K2_E2E_PROMETHEUS_POD_URL")
        if not host or not pod:
            pytest.skip("K2_E2E_PROMETHEUS_URL and K2_E2E_PROMETHEUS_POD_URL name no Prometheus for the live loop")
        pairs = [p.split("=", 1) for p in os.environ.get("K2_E2E_NODE_SELECTOR", "").split(",") if "=" in p]
        return LiveEnv(kubectl, dict(pairs), host, pod)
    if not has_real_node(e2e_cluster):
        skip_or_fail("the local cluster has no real node: `make cluster-down && make cluster-up` starts one")
    local_cluster = load_local_cluster()
    state = local_cluster.State.load(local_cluster.Layout(e2e_cluster.kubeconfig.parent.resolve()))
    if state is None or not state.prometheus_url or not state.prometheus_pod_url:
        skip_or_fail("the local cluster runs no Prometheus: `make cluster-down && make cluster-up` starts one")
    return LiveEnv(kubectl, {"type": "real"}, state.prometheus_url, state.prometheus_pod_url)
