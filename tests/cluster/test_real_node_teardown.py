"""`down` of a cluster with a real node leaves nothing on this machine: no process, mount, network namespace,
interface, route, iptables/nft rule or cgroup, and the host's settings as they were."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster.real_node import lc, real_node_cluster, skip_unless_a_real_node_can_run, toolbox_pod
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


def test_down_after_the_kubelet_and_containerd_died_still_leaves_nothing() -> None:
    skip_unless_a_real_node_can_run()
    before = _host_snapshot()
    with real_node_cluster() as (cluster, layout):
        apply(cluster, toolbox_pod("sleeper", "exec sleep 3600"), namespace="default")
        cluster.kubectl("wait", "-n", "default", "--for=condition=Ready", "pod/sleeper", "--timeout=60s")
        state = lc.State.load(layout)
        for name in ("kubelet", "containerd"):  # a crash: the pod's shim, netns and veth outlive them
            os.kill(state.pids[name], signal.SIGKILL)
        wait_for(
            "both to be gone", lambda: not any(lc.owner(layout).owns(state.pids[n]) for n in ("kubelet", "containerd"))
        )
        assert _host_snapshot()["netns"] != before["netns"]
    assert lc.leftovers(layout) == []
    assert _host_snapshot() == before
