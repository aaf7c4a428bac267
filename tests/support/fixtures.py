"""The pytest plugin (registered by the repository's conftest.py) with the control-plane fixtures:

- `cluster` (session): the cluster of `make cluster-up` when `.cluster/kubeconfig` answers; otherwise one started in
  a temporary directory for the session and stopped at its end, with the real node when this machine can run it
  (under CI it must);
- `namespace`: a fresh namespace per test, deleted afterwards;
- `k2_crds` (session): the K2 CRDs, applied and Established.

Tests that use them are marked `integration` automatically, so `pytest -m "not integration"` needs no control plane.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, crd_files, install_crds, load_local_cluster, make_cluster
from tests.support.paths import TOOLS_BIN
from tests.support.prerequisites import skip_or_fail

CLUSTER_FIXTURES = {"cluster", "namespace", "k2_crds"}
CLUSTER_TOOLS = ("etcd", "kube-apiserver", "kubectl", "kwok")
SERVICE_ACCOUNT_TIMEOUT_S = 30


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Runs before `-m` deselection, so a test using the cluster is deselectable even if its author forgot the mark.
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local control plane: the running `make cluster-up` one, or a fresh one for this session."""
    local_cluster = load_local_cluster()
    shared_dir: Path = local_cluster.DEFAULT_DIR
    if local_cluster.is_healthy(shared_dir):
        state = local_cluster.State.load(local_cluster.Layout(shared_dir.resolve()))
        if state is not None:
            yield make_cluster(shared_dir / "kubeconfig", state.server)
            return
    missing = [name for name in CLUSTER_TOOLS if not (TOOLS_BIN / name).is_file()]
    if missing:
        message = f"{', '.join(missing)} not built in {TOOLS_BIN}: run `make tools` (or `make test`)"
        skip_or_fail(message)
    real_node = _real_node_can_run()
    # Not under pytest's basetemp: a later pytest session rotates those directories away.
    root = Path(tempfile.mkdtemp(prefix="k2-local-cluster-"))
    try:
        state = local_cluster.up(root, real_node=real_node)
    except local_cluster.ClusterError as error:
        pytest.fail(f"the local control plane did not start: {error}", pytrace=False)
    try:
        yield make_cluster(root / "kubeconfig", state.server)
    finally:
        local_cluster.down(root)


def _real_node_can_run() -> bool:
    """Whether the session's cluster gets the real node: when this machine has what it needs and no other live cluster
    here holds it (one per machine). Under CI it must get it. A real node that outlived a killed run is reclaimed."""
    from localcluster import realnode  # hack/ is on sys.path once load_local_cluster() ran

    missing = realnode.missing_prerequisites(TOOLS_BIN)
    holder = load_local_cluster().real_node_holder()
    reason = "; ".join(missing) + " (run `make test`)" if missing else f"the cluster in {holder} holds it"
    if missing or holder is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the real node cannot run here: {reason}", pytrace=False)
        return False
    return True


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its `default` ServiceAccount), deleted after the test without waiting for it to go."""
    name = _namespace_name(request.node.name)
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"k2.ai/test": "true"}}}
    cluster.kubectl("create", "-f", "-", input=json.dumps(manifest))
    # Pods are rejected until the controller-manager has created the namespace's default ServiceAccount.
    deadline = time.monotonic() + SERVICE_ACCOUNT_TIMEOUT_S
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name} got no default ServiceAccount within {SERVICE_ACCOUNT_TIMEOUT_S}s")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def k2_crds(cluster: Cluster) -> list[str]:
    """Applies crds/*.k2.ai.yaml server-side and waits until every CRD is Established; returns the CRD names."""
    files = crd_files()
    if not files:
        skip_or_fail("no crds/*.k2.ai.yaml yet: generate them with `make crds`")
    return install_crds(cluster, files)
