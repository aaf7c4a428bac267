"""Shared pytest fixtures: the real local control plane (hack/local_cluster.py), a namespace per test, the K2 CRDs.

`cluster` reuses the cluster of `make cluster-up` when `.cluster/kubeconfig` answers; otherwise it starts one in a
temporary directory for the session and stops it at the end. Tests that use these fixtures are marked `integration`
automatically, so `pytest -m "not integration"` runs without a control plane.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
CLUSTER_FIXTURES = {"cluster", "namespace", "k2_crds"}
KUBECTL_TIMEOUT_S = 120


def load_local_cluster() -> ModuleType:
    """hack/local_cluster.py, imported by path (hack/ is not a package)."""
    name = "k2_local_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "hack" / "local_cluster.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; str() shows the command and kubectl's stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}:\n{self.stderr}"


@dataclass(frozen=True)
class Cluster:
    """A handle on a running control plane. Never contact pod or Service IPs: only `server` (loopback) is real."""

    kubeconfig: Path
    server: str
    env: dict[str, str]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env, timeout=KUBECTL_TIMEOUT_S, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result


def _make_cluster(kubeconfig: Path, server: str) -> Cluster:
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    env["PATH"] = f"{TOOLS_BIN}{os.pathsep}{env.get('PATH', '')}"
    return Cluster(kubeconfig=kubeconfig, server=server, env=env)


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
            yield _make_cluster(shared_dir / "kubeconfig", state.server)
            return
    missing = [n for n in ("etcd", "kube-apiserver", "kubectl", "kwok") if not (TOOLS_BIN / n).is_file()]
    if missing:
        message = f"{', '.join(missing)} not built in {TOOLS_BIN}: run `make tools` (or `make test`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's basetemp: a later pytest session rotates those directories away.
    root = Path(tempfile.mkdtemp(prefix="k2-local-cluster-"))
    try:
        state = local_cluster.up(root)
    except local_cluster.ClusterError as error:
        pytest.fail(f"the local control plane did not start: {error}", pytrace=False)
    try:
        yield _make_cluster(root / "kubeconfig", state.server)
    finally:
        local_cluster.down(root)


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
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"namespace {name} got no default ServiceAccount within 30s")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def k2_crds(cluster: Cluster) -> list[str]:
    """Applies crds/*.k2.ai.yaml server-side and waits until every CRD is Established; returns the CRD names."""
    files = sorted((ROOT / "crds").glob("*.k2.ai.yaml"))
    if not files:
        pytest.skip("no crds/*.k2.ai.yaml yet: generate them with `make crds`")
    names = [doc["metadata"]["name"] for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names
