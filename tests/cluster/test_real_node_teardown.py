"""`down` of a cluster with a real node leaves nothing on this machine: no process, mount, network namespace,
interface, route, iptables/nft rule or cgroup, and the host's settings as they were."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.cluster.real_node import lc, real_node_cluster, skip_unless_a_real_node_can_run, toolbox_pod
from tests.support.cluster import make_cluster
from tests.support.kube import apply
from tests.support.waits import wait_for

# Each test starts a real-node cluster of its own, so none may hold the machine's real node meanwhile: `make test` runs
# these in a pytest call of their own, before the main session (whose cluster takes the real node).
pytestmark = [pytest.mark.integration, pytest.mark.realnode_exclusive]


def _lines(*argv: str) -> list[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()


def _host_snapshot() -> dict[str, object]:
    """What the real node may change on the host, in comparable form."""
    return {
        "links": sorted(line.split()[0] for line in _lines("ip", "-br", "link")),
        "routes": sorted(_lines("ip", "route")),
        "iptables": sorted(r for r in _lines("iptables-save") if r.startswith("-A")),
        "ip6tables": sorted(r for r in _lines("ip6tables-save") if r.startswith("-A")),
        "nft tables": sorted(_lines("nft", "list", "tables")),
        "mounts": sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()),
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")),
        "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/k8s.io")),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


def test_down_leaves_the_host_as_it_was() -> None:
    skip_unless_a_real_node_can_run()
    before = _host_snapshot()
    with real_node_cluster() as (cluster, layout):
        apply(cluster, toolbox_pod("sleeper", "exec sleep 3600"), namespace="default")
        cluster.kubectl("wait", "-n", "default", "--for=condition=Ready", "pod/sleeper", "--timeout=60s")
        during = _host_snapshot()
        # The check can fail: a running pod has changed each of these.
        for key in ("links", "routes", "iptables", "mounts", "netns", "cgroups"):
            assert during[key] != before[key], key
        assert lc.leftover_pids(layout)
    assert lc.leftovers(layout) == []
    after = _host_snapshot()
    assert after == before
    assert not layout.root.exists()


def _mounts_under(root: Path) -> list[str]:
    mounts = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [point for point in mounts if point.startswith(f"{root.resolve()}/")]


def test_a_real_node_whose_cluster_was_killed_is_cleaned_up_by_the_next_one() -> None:
    """A killed run (every process SIGKILLed, as when a machine is stopped mid-suite) leaves the bridge, the mounts, the
    pods' namespaces and cgroups behind. The next cluster with a real node removes them and starts (a stale bridge once
    made CI skip every real-node test); the dead cluster's directory stays, for its logs. This also covers `down` after
    the kubelet and containerd died: containerd is started again on the dead state to remove its pods."""
    skip_unless_a_real_node_can_run()
    before = _host_snapshot()
    dead_root = Path(tempfile.mkdtemp(prefix="k2-killed-cluster-"))
    dead = lc.Layout(dead_root.resolve())
    try:
        state = lc.up(dead_root, num_nodes=1, real_node=True)
        killed = make_cluster(dead_root / "kubeconfig", state.server)
        apply(killed, toolbox_pod("sleeper", "exec sleep 3600"), namespace="default")
        killed.kubectl("wait", "-n", "default", "--for=condition=Ready", "pod/sleeper", "--timeout=60s")
        for pid in lc.leftover_pids(dead):
            os.kill(pid, signal.SIGKILL)
        wait_for("every process of the cluster to be gone", lambda: not lc.leftover_pids(dead))
        left = _host_snapshot()
        assert left["netns"] != before["netns"] and left["links"] != before["links"] and _mounts_under(dead_root)
        assert lc.real_node_holder() is None  # free: its holder is dead

        with real_node_cluster() as (cluster, layout):
            assert lc.real_node_holder() == layout.root
            assert _mounts_under(dead_root) == []
            apply(cluster, toolbox_pod("sleeper", "exec sleep 3600"), namespace="default")
            cluster.kubectl("wait", "-n", "default", "--for=condition=Ready", "pod/sleeper", "--timeout=60s")
        assert dead.log("kubelet").is_file()
    finally:
        lc.down(dead_root)
    assert lc.leftovers(dead) == []
    assert _host_snapshot() == before
