"""Unit tests of the real node's pure parts: address plan, CNI network, firewall, configs, the pause image archive."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path

from tests.support.cluster import load_local_cluster

lc = load_local_cluster()
from localcluster import cni, containerd, dns, host, images, kubelet, kubeproxy, network  # noqa: E402

HOME = Path("/tmp/k2-cluster-under-test/node")


def test_the_real_pods_range_is_apart_from_every_other_range() -> None:
    real = ipaddress.ip_network(network.REAL_POD_CIDR)
    others = [lc.POD_CIDR, lc.SERVICE_CIDR, network.KWOK_NODE_CIDR]
    assert not any(real.overlaps(ipaddress.ip_network(o)) for o in others)
    assert ipaddress.ip_address(network.GATEWAY) in real
    assert all(ipaddress.ip_network(c).is_private for c in [network.REAL_POD_CIDR, *others])
    # The kwok fake ranges are the unreachable ones; every kwok node's InternalIP lies in them.
    assert set(network.UNREACHABLE) == {lc.POD_CIDR, network.KWOK_NODE_CIDR}
    kwok_nodes = ipaddress.ip_network(network.KWOK_NODE_CIDR)
    assert all(ipaddress.ip_address(lc.NODE_IP.format(i + 1)) in kwok_nodes for i in range(lc.MAX_NODES))


def test_pods_get_no_default_route_no_masquerade_and_only_the_cluster_ranges() -> None:
    config = cni.conflist(HOME / "ipam")
    bridge = config["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["bridge"] == network.BRIDGE
    assert bridge["ipMasq"] is False
    ranges = bridge["ipam"]["ranges"]
    assert ranges == [[{"subnet": network.REAL_POD_CIDR, "gateway": network.GATEWAY}]]
    routes = [ipaddress.ip_network(r["dst"]) for r in bridge["ipam"]["routes"]]
    assert routes == [ipaddress.ip_network(lc.SERVICE_CIDR)]
    assert not any(r.prefixlen == 0 for r in routes), "no default route"
    assert bridge["ipam"]["dataDir"].startswith(str(HOME)), "IPAM state stays in the cluster directory"
    assert {p["type"] for p in config["plugins"]} | {"host-local", "loopback"} == set(cni.PLUGINS)


def test_the_firewall_confines_the_bridge_and_sends_the_kubernetes_service_to_loopback() -> None:
    rules = network.firewall_rules(6443).splitlines()
    assert "-A K2-FORWARD -i k2br0 -o k2br0 -j ACCEPT" in rules
    assert "-A K2-FORWARD -i k2br0 -j REJECT" in rules
    assert "-A K2-FORWARD -o k2br0 -j REJECT" in rules
    dnat = [r for r in rules if "DNAT" in r]
    assert dnat == [
        "-A K2-PREROUTING -i k2br0 -d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination 127.0.0.1:6443"
    ]
    assert not any("MASQUERADE" in r or "SNAT" in r for r in rules)


def test_cleanup_removes_only_our_chains_and_the_rules_that_jump_to_them() -> None:
    saved = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:OTHER - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j OTHER
-A KUBE-FORWARD -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j DOCKER
COMMIT
"""
    script = network.cleanup_rules(saved).splitlines()
    assert script == [
        "*filter",
        "-D INPUT -j KUBE-FIREWALL",
        '-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-F KUBE-FORWARD",
        "-X KUBE-FORWARD",
        "COMMIT",
    ]
    assert network.cleanup_rules("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


def test_containerd_is_private_refuses_pulls_and_keeps_oom_score_adj() -> None:
    runtime = containerd.Containerd(HOME / "containerd")
    config = containerd.config_toml(runtime, images.PAUSE_IMAGE, Path("/cni/bin"), HOME / "cni")
    assert f'address = "{runtime.socket}"' in config
    assert f'state = "{runtime.state}"' in config
    assert "restrict_oom_score_adj = true" in config
    assert f'sandbox_image = "{images.PAUSE_IMAGE}"' in config
    assert 'stream_server_address = "127.0.0.1"' in config
    env = containerd.environment()
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == containerd.NO_PULL_PROXY
    assert containerd.NO_PULL_PROXY.startswith("http://127.0.0.1:")


def test_kubelet_listens_on_the_bridge_and_loopback_and_authenticates_callers() -> None:
    config = kubelet.config(HOME / "kubelet", Path("/pki"), "unix:///sock", 10250, 10248)
    assert config["address"] == network.GATEWAY and config["healthzBindAddress"] == "127.0.0.1"
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"] == {"enabled": False}
    assert config["authorization"]["mode"] == "Webhook"
    assert config["clusterDNS"] == [network.GATEWAY]
    assert config["cgroupDriver"] == "cgroupfs" and config["failCgroupV1"] is False
    assert config["imageGCHighThresholdPercent"] == 100, "imported images are never collected"
    for key in ("resolvConf", "podLogsDir", "volumePluginDir"):
        assert config[key].startswith(str(HOME)), key
    assert kubelet.resolv_conf() == f"nameserver {network.GATEWAY}\n"
    argv = kubelet.argv(Path("/tools/kubelet"), HOME / "kubelet")
    assert f"--node-ip={network.GATEWAY}" in argv
    assert any(a.startswith("--root-dir=" + str(HOME)) for a in argv)


def test_kube_proxy_leaves_host_settings_alone_and_serves_node_ports_only_on_the_bridge() -> None:
    config = kubeproxy.config(Path("/kubeconfig"), 1, 2)
    assert config["mode"] == "iptables"
    assert config["nodePortAddresses"] == [f"{network.GATEWAY}/32"]
    assert config["iptables"]["localhostNodePorts"] is False
    assert config["conntrack"]["maxPerCore"] == 0
    assert config["conntrack"]["tcpEstablishedTimeout"] == config["conntrack"]["tcpCloseWaitTimeout"] == "0s"
    assert config["healthzBindAddress"].startswith("127.0.0.1:")
    assert config["metricsBindAddress"].startswith("127.0.0.1:")


def test_coredns_serves_only_cluster_zones_on_the_bridge() -> None:
    corefile = dns.corefile(Path("/kubeconfig"), 1, 2)
    assert corefile.splitlines()[0] == "cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {"
    assert f"bind {network.GATEWAY}" in corefile
    assert "forward" not in corefile


def test_apiserver_reaches_kubelets_by_internal_ip_only_with_a_real_node() -> None:
    ports = lc.Ports(2379, 2380, 6443, 10257, 10259, 10247)
    layout = lc.Layout(Path("/tmp/k2-cluster-under-test"))
    plain = lc.command_lines(layout, ports, Path("/tools"))["kube-apiserver"]
    real = lc.command_lines(layout, ports, Path("/tools"), real_node=True)["kube-apiserver"]
    assert "--kubelet-preferred-address-types=InternalIP" in set(real) - set(plain)
    assert any(a.startswith("--kubelet-client-certificate=") for a in plain)


def test_docker_archive_has_one_layer_whose_digest_the_config_names() -> None:
    archive = images.docker_archive("docker.io/k2-operator/x:1", {"bin/x": (b"\x7fELF", 0o755)}, ["/bin/x"], {"y": "x"})
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        [entry] = manifest
        assert entry["RepoTags"] == ["docker.io/k2-operator/x:1"]
        config = json.load(tar.extractfile(entry["Config"]))  # type: ignore[arg-type]
        layer = tar.extractfile(entry["Layers"][0]).read()  # type: ignore[union-attr]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert config["config"]["Entrypoint"] == ["/bin/x"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as files:
        assert files.getmember("bin/x").mode == 0o755
        assert files.getmember("y").issym()
    assert images.docker_archive("docker.io/k2-operator/x:1", {"bin/x": (b"\x7fELF", 0o755)}, ["/bin/x"]) == (
        images.docker_archive("docker.io/k2-operator/x:1", {"bin/x": (b"\x7fELF", 0o755)}, ["/bin/x"])
    ), "deterministic: an unchanged image imports as the same digest"


def test_mount_points_below_the_cluster_are_found_deepest_first_with_escapes() -> None:
    mountinfo = "\n".join(
        [
            "22 1 8:1 / / rw - ext4 /dev/vda rw",
            "90 22 0:50 / /tmp/c/node/kubelet/root rw - ext4 /dev/vda rw",
            "91 90 0:51 / /tmp/c/node/kubelet/root/pods/u/volumes/x rw - tmpfs tmpfs rw",
            "92 22 0:52 / /tmp/c/with\\040space rw - tmpfs tmpfs rw",
            "93 22 0:53 / /tmp/cluster-other rw - tmpfs tmpfs rw",
        ]
    )
    points = host.mount_points(mountinfo, (Path("/tmp/c"),))
    assert points == [
        Path("/tmp/c/node/kubelet/root/pods/u/volumes/x"),
        Path("/tmp/c/node/kubelet/root"),
        Path("/tmp/c/with space"),
    ]
