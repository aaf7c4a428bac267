"""A handle on a running control plane, and what sets one up: the local-cluster code of hack/, the K2 CRDs.

hack/ is not on sys.path, so `load_local_cluster` imports `hack/local_cluster.py` by path; its public names are
`up`, `down`, `is_healthy`, `State`, `Layout`, `DEFAULT_DIR` and `ClusterError`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import yaml

from tests.support.paths import ROOT, TOOLS_BIN

KUBECTL_TIMEOUT_S = 120
LOCAL_CLUSTER_MODULE = "k2_local_cluster"


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
        """Runs `kubectl ARGS` against this cluster; raises `KubectlError` on a non-zero exit unless `check=False`."""
        argv = [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env, timeout=KUBECTL_TIMEOUT_S, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result


def make_cluster(kubeconfig: Path, server: str) -> Cluster:
    """A handle whose environment (for kubectl and the processes tests start) points at `kubeconfig`."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    env["PATH"] = f"{TOOLS_BIN}{os.pathsep}{env.get('PATH', '')}"
    return Cluster(kubeconfig=kubeconfig, server=server, env=env)


def server_of(kubeconfig: Path) -> str:
    """The API server URL of the kubeconfig's current context."""
    config = yaml.safe_load(kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    server: str = next(c for c in config["clusters"] if c["name"] == context["context"]["cluster"])["cluster"]["server"]
    return server


def load_local_cluster() -> ModuleType:
    """hack/local_cluster.py, imported by path once per process."""
    if LOCAL_CLUSTER_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(LOCAL_CLUSTER_MODULE, ROOT / "hack" / "local_cluster.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[LOCAL_CLUSTER_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[LOCAL_CLUSTER_MODULE]


def crd_files() -> list[Path]:
    """The generated K2 CRDs, crds/*.k2.ai.yaml (empty before `make crds`)."""
    return sorted((ROOT / "crds").glob("*.k2.ai.yaml"))


def install_crds(cluster: Cluster, files: list[Path]) -> list[str]:
    """Applies the CRD files server-side, waits until every CRD is Established and returns the CRD names."""
    names = [doc["metadata"]["name"] for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names
