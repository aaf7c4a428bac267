"""What the real-node tests share: whether a real node can run here, and starting one in a temporary directory."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import Cluster, load_local_cluster, make_cluster
from tests.support.paths import TOOLS_BIN
from tests.support.prerequisites import skip_or_fail

lc = load_local_cluster()
from localcluster import kubelet, realnode  # noqa: E402

TOOLBOX = "docker.io/k2-operator/toolbox:local"


def has_real_node(cluster: Cluster) -> bool:
    """Whether `cluster` has the real node (a registered node named like the kubelet's)."""
    result = cluster.kubectl("get", "node", kubelet.NODE_NAME, "-o", "name", check=False)
    return result.returncode == 0


def skip_unless_a_real_node_can_run() -> None:
    """Skips (fails under CI) when this machine lacks something, or when another live cluster's real node runs here
    (one that outlived a killed run is reclaimed by the next start)."""
    missing = realnode.missing_prerequisites(TOOLS_BIN)
    if not Path("/bin/busybox").is_file():
        missing.append("/bin/busybox (Debian package busybox-static, for the toolbox image)")
    if missing:
        message = "a real node cannot run here: " + "; ".join(missing)
        skip_or_fail(message)
    holder = lc.real_node_holder()
    if holder is not None:
        skip_or_fail(f"the real node of the cluster in {holder} runs on this machine; one per machine")


@contextmanager
def real_node_cluster() -> Iterator[tuple[Cluster, Any]]:
    """A cluster with one kwok node and the real node, in a temporary directory; stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="k2-real-node-"))
    try:
        state = lc.up(root, num_nodes=1, real_node=True)
    except lc.ClusterError as error:
        lc.down(root)
        pytest.fail(f"the cluster with a real node did not start: {error}", pytrace=False)
    try:
        yield make_cluster(root / "kubeconfig", state.server), lc.Layout(root.resolve())
    finally:
        lc.down(root)


def toolbox_pod(name: str, command: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A pod on the real node running `command` in the busybox toolbox image."""
    container = {"name": "main", "image": TOOLBOX, "imagePullPolicy": "Never", "command": ["sh", "-c", command]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"nodeSelector": {"type": "real"}, "containers": [container], **spec},
    }
