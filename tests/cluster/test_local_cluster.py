"""Unit tests of hack/localcluster: the address plan, node manifests, command lines, process ownership; one up/down."""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path

import pytest

from tests.support.cluster import load_local_cluster
from tests.support.prerequisites import skip_or_fail

lc = load_local_cluster()
from localcluster import nodes, processes  # noqa: E402  (on sys.path once the entry script is loaded)

ROOT = Path("/tmp/k2-cluster-under-test")


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


@pytest.fixture
def argv() -> dict[str, list[str]]:
    ports = lc.Ports(2379, 2380, 6443, 10257, 10259, 10247)
    result: dict[str, list[str]] = lc.command_lines(lc.Layout(ROOT), ports, Path("/opt/tools"))
    return result


def test_address_ranges_do_not_overlap() -> None:
    services = ipaddress.ip_network(lc.SERVICE_CIDR)
    pods = ipaddress.ip_network(lc.POD_CIDR)
    node_ips = [ipaddress.ip_address(lc.NODE_IP.format(i)) for i in range(1, 255)]
    assert not services.overlaps(pods)
    assert not any(ip in services or ip in pods or ip.is_loopback for ip in node_ips)


def test_components_use_disjoint_pod_and_service_ranges(argv: dict[str, list[str]]) -> None:
    services = ipaddress.ip_network(_flag(argv["kube-apiserver"], "service-cluster-ip-range"))
    pods = ipaddress.ip_network(_flag(argv["kwok"], "cidr"))
    assert not services.overlaps(pods)


def test_every_component_listens_on_loopback_only(argv: dict[str, list[str]]) -> None:
    assert _flag(argv["kube-apiserver"], "bind-address") == "127.0.0.1"
    assert _flag(argv["kube-controller-manager"], "bind-address") == "127.0.0.1"
    assert _flag(argv["kube-scheduler"], "bind-address") == "127.0.0.1"
    assert _flag(argv["kwok"], "server-address").startswith("127.0.0.1:")
    for name in ("listen-client-urls", "listen-peer-urls"):
        assert _flag(argv["etcd"], name).startswith("http://127.0.0.1:")


def test_apiserver_enforces_rbac_and_pod_security(argv: dict[str, list[str]]) -> None:
    apiserver = argv["kube-apiserver"]
    assert "RBAC" in _flag(apiserver, "authorization-mode").split(",")
    assert "PodSecurity" in _flag(apiserver, "enable-admission-plugins").split(",")
    assert _flag(apiserver, "endpoint-reconciler-type") == "none"
    assert _flag(apiserver, "service-account-signing-key-file").endswith("sa.key")


def test_every_command_line_names_the_cluster_directory(argv: dict[str, list[str]]) -> None:
    # `down` finds leftover processes by this directory: every component must mention it.
    assert list(argv) == list(lc.COMPONENTS)
    for name, command in argv.items():
        assert Path(command[0]).name == name
        assert any(str(ROOT) in a for a in command[1:]), name


def test_gpu_nodes_have_8_gpus_topology_and_own_pod_ranges() -> None:
    nodes = [lc.gpu_node_manifest(i) for i in range(lc.NUM_NODES)]
    assert lc.NUM_NODES >= 4
    assert len({n["metadata"]["name"] for n in nodes}) == lc.NUM_NODES
    pods = ipaddress.IPv4Network(lc.POD_CIDR)
    ranges = [ipaddress.IPv4Network(n["spec"]["podCIDR"]) for n in nodes]
    assert all(r.subnet_of(pods) for r in ranges)
    assert not any(a.overlaps(b) for i, a in enumerate(ranges) for b in ranges[i + 1 :])
    for node in nodes:
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["status"]["capacity"] == node["status"]["allocatable"]
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert "taints" not in node["spec"]
    assert [n["metadata"]["labels"]["k2.ai/rack"] for n in nodes] == ["rack-0", "rack-0", "rack-1", "rack-1"]
    assert {n["metadata"]["labels"]["topology.kubernetes.io/zone"] for n in nodes} == {"zone-a"}


def test_kubeconfig_embeds_credentials() -> None:
    doc = lc.kubeconfig_document("https://127.0.0.1:6443", "CA", "CERT", "KEY")
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    assert doc["current-context"] == doc["contexts"][0]["name"]


def test_only_component_processes_count_as_ours(tmp_path: Path) -> None:
    layout = lc.Layout(tmp_path)
    assert not lc.owner(layout).owns(os.getpid())
    assert lc.leftover_pids(layout) == []


def test_a_process_naming_the_directory_is_owned_and_its_group_stopped(tmp_path: Path) -> None:
    owner = processes.Owner(tmp_path, programs={"sh"})
    (tmp_path / "logs").mkdir()
    process = processes.spawn(
        ["/bin/sh", "-c", "sleep 600; :", f"{tmp_path}/marker"], tmp_path / "logs" / "sleep.log", tmp_path
    )
    try:
        processes.wait_for("sleep to exec", lambda: owner.owns(process.pid), "sh", tmp_path / "logs", process, 10.0)
        assert owner.live_pids() == [process.pid]
        assert not processes.Owner(tmp_path / "other", programs={"sh"}).owns(process.pid)
        assert os.getpgid(process.pid) == process.pid, "each component leads its own process group"
    finally:
        processes.stop_group(process.pid, owner, grace_s=5.0)
    assert process.poll() is not None
    assert owner.live_pids() == []


def test_wait_for_names_the_component_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "etcd.log"
    log.write_text("first\nlast words\n")
    process = processes.spawn(["/bin/false"], log, tmp_path)
    with pytest.raises(lc.ClusterError, match=r"(?s)etcd exited with code 1 while waiting for health.*last words"):
        processes.wait_for("health", lambda: False, "etcd", log, process)
    with pytest.raises(lc.ClusterError, match="timed out after 0s waiting for health"):
        processes.wait_for("health", lambda: False, "etcd", log, None, timeout_s=0.0)


def test_node_summary_counts_ready_nodes_and_their_gpus() -> None:
    ready = lc.gpu_node_manifest(0) | {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    ready["status"]["allocatable"] = {"nvidia.com/gpu": "8"}
    assert nodes.summarize([ready, lc.gpu_node_manifest(1)]) == "1 Ready x 8 nvidia.com/gpu"
    assert nodes.summarize([]) == "0 Ready x 0 nvidia.com/gpu"


def test_down_without_a_cluster_is_a_no_op(tmp_path: Path) -> None:
    lc.down(tmp_path / "never-started")
    assert not (tmp_path / "never-started").exists()


def test_refuses_to_remove_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(lc.ClusterError, match="refusing"):
        lc.down(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.integration
def test_up_is_idempotent_and_down_leaves_no_process(tmp_path: Path) -> None:
    if not (lc.TOOLS_BIN / "kube-apiserver").is_file():
        skip_or_fail("the control-plane binaries are not built: run `make tools`")
    root = tmp_path / "cluster"
    layout = lc.Layout(root.resolve())
    state = lc.up(root, num_nodes=1)
    try:
        pids = dict(state.pids)
        assert sorted(pids) == sorted(lc.COMPONENTS)
        assert lc.is_healthy(root)
        assert lc.up(root, num_nodes=1).pids == pids, "a healthy cluster is kept, not restarted"
        assert sorted(lc.leftover_pids(layout)) == sorted(pids.values())
    finally:
        lc.down(root)
    assert lc.leftover_pids(layout) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert not root.exists()
    assert not lc.is_healthy(root)
