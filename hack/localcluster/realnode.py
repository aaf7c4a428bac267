"""The real node: containerd + runc, a kubelet, kube-proxy and CoreDNS on this machine, beside the kwok nodes.

`start` runs after the control plane is up; `stop` removes every trace (processes, pods, mounts, cgroups, the pod
network). One real node per machine: its bridge, routes and firewall chains have fixed names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import api, dns, host, images, kubelet, kubeproxy, network, processes
from .cni import PLUGINS, conflist
from .containerd import Containerd, config_toml, crictl, environment, import_image
from .containerd import argv as containerd_argv
from .controlplane import free_port_set
from .errors import ClusterError
from .layout import ROOT, Layout, State
from .nodes import GPU_RESOURCE, GPUS_PER_NODE, node_ready
from .pki import kubeconfig_for

REAL_NODE_COMPONENTS = ("containerd", "coredns", "kubelet", "kube-proxy")
SHIM = "containerd-shim-runc-v2"
CNI_BIN = ROOT / ".tools" / "cni" / "bin"
# `make image` writes the worker image here (hack/image/); up imports it when containerd lacks it.
WORKER_ARCHIVE = Path.home() / ".cache" / "k2-image" / "worker-dev.oci.tar"
WORKER_IMPORT = ROOT / "hack" / "image"  # `python hack/image import SOCKET ARCHIVE`: skipped when already there
PORT_NAMES = ("kubelet", "kubelet_healthz", "kube_proxy_healthz", "kube_proxy_metrics", "dns_health", "dns_ready")

Spawn = Callable[[str, list[str], "dict[str, str] | None"], "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class NodeFiles:
    """Where the real node's files live inside the cluster directory."""

    home: Path

    @property
    def containerd(self) -> Containerd:
        return Containerd(self.home / "containerd")

    @property
    def cni_conf(self) -> Path:
        return self.home / "cni" / "net.d"

    @property
    def kubelet(self) -> Path:
        return self.home / "kubelet"

    @property
    def kube_proxy(self) -> Path:
        return self.home / "kube-proxy"

    @property
    def coredns(self) -> Path:
        return self.home / "coredns"


def missing_prerequisites(tools: Path) -> list[str]:
    """What this machine lacks to run the real node (empty when it can): root, Debian packages, built tools."""
    missing = [] if os.geteuid() == 0 else ["root (the node makes network namespaces, mounts and cgroups)"]
    commands = {"containerd": "containerd", "containerd-shim-runc-v2": "containerd", "ctr": "containerd"}
    commands |= {"runc": "runc", "iptables-restore": "iptables", "nft": "nftables", "ip": "iproute2", "gcc": "gcc"}
    missing += [f"{c} (Debian package {p})" for c, p in commands.items() if shutil.which(c) is None]
    built = [tools / name for name in ("kubelet", "kube-proxy", "coredns", "crictl")]
    built += [CNI_BIN / name for name in PLUGINS]
    missing += [f"{path} (make tools)" for path in built if not path.is_file()]
    return missing


def _write_yaml(path: Path, document: object) -> None:
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _write_configs(layout: Layout, state: State, files: NodeFiles) -> None:
    ports, pki = state.ports, layout.pki
    directories = (files.cni_conf, files.kubelet / "pod-logs", files.kubelet / "volume-plugins", files.kube_proxy)
    for directory in (*directories, files.coredns, files.containerd.home, files.containerd.store):
        directory.mkdir(parents=True, exist_ok=True)
    files.containerd.config.write_text(config_toml(files.containerd, images.PAUSE_IMAGE, CNI_BIN, files.cni_conf))
    (files.cni_conf / "10-k2-local.conflist").write_text(json.dumps(conflist(files.home / "cni" / "ipam"), indent=2))
    kubelet.make_certs(pki)
    node_user = f"system:node:{kubelet.NODE_NAME}"
    _write_yaml(files.kubelet / "kubeconfig", kubeconfig_for(state.server, pki, "kubelet-client", node_user))
    config = kubelet.config(files.kubelet, pki, files.containerd.endpoint, ports["kubelet"], ports["kubelet_healthz"])
    _write_yaml(files.kubelet / "config.yaml", config)
    (files.kubelet / "resolv.conf").write_text(kubelet.resolv_conf())
    proxy = kubeproxy.config(layout.kubeconfig, ports["kube_proxy_healthz"], ports["kube_proxy_metrics"])
    _write_yaml(files.kube_proxy / "config.yaml", proxy)
    corefile = dns.corefile(layout.kubeconfig, ports["dns_health"], ports["dns_ready"])
    (files.coredns / "Corefile").write_text(corefile)


def _containerd_answers(files: NodeFiles, crictl_bin: Path) -> bool:
    if not files.containerd.socket.is_socket():
        return False
    try:
        crictl(files.containerd, crictl_bin, "info", timeout_s=10)
    except (ClusterError, subprocess.TimeoutExpired):
        return False
    return True


def _import_images(layout: Layout, files: NodeFiles) -> None:
    # Both are small (a few MB): importing them again is quick, and replaces an older build under the same tag.
    import_image(files.containerd, images.build_pause(files.home))
    toolbox = images.build_toolbox(files.home)
    if toolbox is not None:
        import_image(files.containerd, toolbox)
    import_worker_image(layout)


def import_worker_image(layout: Layout) -> None:
    """Imports `make image`'s archive when there is one; the import is skipped when containerd has that digest, so a
    `make cluster-up` on a running cluster takes a rebuilt image in a second or two."""
    files = NodeFiles(layout.node)
    if WORKER_ARCHIVE.is_file() and (WORKER_IMPORT / "__main__.py").is_file():
        log = layout.log("image-import")
        with log.open("ab") as out:
            result = subprocess.run(
                [sys.executable, str(WORKER_IMPORT), "import", str(files.containerd.socket), str(WORKER_ARCHIVE)],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            free_gib = shutil.disk_usage(files.containerd.store).free / 2**30
            raise ClusterError(
                f"importing {WORKER_ARCHIVE} failed ({free_gib:.1f} GiB free beside the image store"
                f" {files.containerd.store}; an import of the dependency layer takes about 9 GiB); log: {log}\n"
                f"{processes.log_tail(log)}"
            )


def _the_node(layout: Layout, state: State) -> dict[str, Any] | None:
    status, body = api.api_request(layout, state, "GET", f"/api/v1/nodes/{kubelet.NODE_NAME}")
    return body if status == 200 and isinstance(body, dict) else None


def _node_is_ready(layout: Layout, state: State) -> bool:
    node = _the_node(layout, state)
    return node is not None and node_ready(node)


def _advertise_gpus(layout: Layout, state: State) -> None:
    """Adds `nvidia.com/gpu: 8` to the node's capacity (an extended resource; the kubelet copies it to allocatable)."""
    patch = {"status": {"capacity": {GPU_RESOURCE: str(GPUS_PER_NODE)}}}
    path = f"/api/v1/nodes/{kubelet.NODE_NAME}/status"
    status, body = api.api_request(layout, state, "PATCH", path, patch, "application/merge-patch+json")
    if status != 200:
        raise ClusterError(f"patching {path} failed with HTTP {status}: {body}")


def _gpus_allocatable(layout: Layout, state: State) -> bool:
    node = _the_node(layout, state)
    allocatable = node.get("status", {}).get("allocatable", {}) if node else {}
    return bool(allocatable.get(GPU_RESOURCE) == str(GPUS_PER_NODE))


def check_can_start(tools: Path) -> None:
    """Fails before anything is made when the real node cannot run here, or another one runs (one per machine).

    It must run before `start` creates the node's directory: `down` treats that directory as "ours to clean up".
    """
    missing = missing_prerequisites(tools)
    if missing:
        raise ClusterError("the real node needs: " + "; ".join(missing) + " (hack/install-system-packages.sh)")
    holder = network.bridge_owner()
    if holder is not None:
        raise ClusterError(
            f"the interface {network.BRIDGE} exists: the real node of the cluster in {holder} holds this machine "
            f"(one per machine; `python hack/local_cluster.py down --dir {holder}` stops it)"
        )


def start(layout: Layout, state: State, tools: Path, spawn: Spawn) -> None:
    """Brings up the real node against the running control plane and waits until it is Ready with its GPUs."""
    check_can_start(tools)
    files = NodeFiles(layout.node)
    state.ports.update(dict(zip(PORT_NAMES, free_port_set(len(PORT_NAMES)), strict=True)))
    state.host = {"ip_forward": network.IP_FORWARD.read_text(), "nft_tables": sorted(network.nft_tables())}
    state.save(layout)
    _write_configs(layout, state, files)
    network.setup(state.ports["apiserver"], layout.root)

    def wait(what: str, check: Callable[[], bool], component: str, process: subprocess.Popen[bytes]) -> None:
        processes.wait_for(what, check, component, layout.log(component), process)

    crictl_bin = tools / "crictl"
    containerd = spawn("containerd", containerd_argv(files.containerd), environment())
    wait("containerd's CRI", lambda: _containerd_answers(files, crictl_bin), "containerd", containerd)
    _import_images(layout, files)
    crictl(files.containerd, crictl_bin, "rmp", "--all", "--force")  # sandboxes a crashed run left

    coredns = spawn("coredns", dns.argv(tools / "coredns", files.coredns / "Corefile"), None)
    ready = f"http://127.0.0.1:{state.ports['dns_ready']}/ready"
    wait(f"CoreDNS {ready}", lambda: api.healthz_ok(ready), "coredns", coredns)

    node = spawn("kubelet", kubelet.argv(tools / "kubelet", files.kubelet), None)
    wait(f"node {kubelet.NODE_NAME} Ready", lambda: _node_is_ready(layout, state), "kubelet", node)
    _advertise_gpus(layout, state)
    wait(f"{GPUS_PER_NODE} {GPU_RESOURCE} allocatable", lambda: _gpus_allocatable(layout, state), "kubelet", node)

    proxy = spawn("kube-proxy", kubeproxy.argv(tools / "kube-proxy", files.kube_proxy / "config.yaml"), None)
    healthz = f"http://127.0.0.1:{state.ports['kube_proxy_healthz']}/healthz"
    wait(f"kube-proxy {healthz}", lambda: api.healthz_ok(healthz), "kube-proxy", proxy)


def _remove_pods(layout: Layout, files: NodeFiles, crictl_bin: Path) -> None:
    """Removes every pod sandbox through the CRI, so that the CNI plugins release each veth, netns and address.

    When containerd died, it is started again on the same state first: only it knows its sandboxes.
    """
    if not _containerd_answers(files, crictl_bin):
        revived = processes.spawn(
            containerd_argv(files.containerd), layout.log("containerd"), layout.root, environment()
        )
        try:
            processes.wait_for(
                "containerd, restarted to remove the pods",
                lambda: _containerd_answers(files, crictl_bin),
                "containerd",
                layout.log("containerd"),
                revived,
                timeout_s=30.0,
            )
        except ClusterError as error:
            print(f"local cluster: {error}", file=sys.stderr)
            return
    try:
        crictl(files.containerd, crictl_bin, "rmp", "--all", "--force")
    except (ClusterError, subprocess.TimeoutExpired) as error:
        print(f"local cluster: removing the real node's pods: {error}", file=sys.stderr)


def stop(layout: Layout, state: State | None, tools: Path) -> None:
    """Stops the node's components and pods, then removes its mounts, cgroups and network. Idempotent."""
    files = NodeFiles(layout.node)
    owner = processes.Owner(layout.root, (*REAL_NODE_COMPONENTS, SHIM))
    pids = state.pids if state is not None else {}
    # The kubelet first, or it would restart the pods removed below; found by name, so also without state.json.
    for pid in processes.Owner(layout.root, ("kubelet",)).live_pids():
        processes.stop_group(pid, owner, grace_s=10.0)
    if files.containerd.config.is_file() and (tools / "crictl").is_file():
        _remove_pods(layout, files, tools / "crictl")
    for name in ("kube-proxy", "coredns", "containerd"):
        if name in pids:
            processes.stop_group(pids[name], owner, grace_s=10.0)
    for pid in owner.live_pids():
        processes.stop_group(pid, owner, grace_s=5.0)
    host.kill_and_remove_cgroups()
    host.unmount_under(layout.root)
    host.remove_runtime_dirs()
    saved = state.host if state is not None else {}
    network.teardown(saved.get("nft_tables"), saved.get("ip_forward"))


def host_leftovers(layout: Layout) -> list[str]:
    """The real node's mounts, cgroups, interfaces, routes, namespaces and rules still on this machine."""
    return host.leftovers(layout.root) + network.leftovers()
