"""The real node's private containerd: its config, and the ctr/crictl calls cluster-up and cluster-down make.

Its image store (`root`) outlives the cluster, so imported images survive `down`; everything that runs (state,
socket, shim bundles) lives in the cluster directory and goes with it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import ClusterError

IMAGE_STORE = Path.home() / ".cache" / "k2-containerd"
NAMESPACE = "k8s.io"  # where the CRI plugin keeps the kubelet's images and containers
# Pulls go through this proxy, which refuses: nothing is ever fetched from a registry.
NO_PULL_PROXY = "http://127.0.0.1:9"


@dataclass(frozen=True)
class Containerd:
    """One containerd instance: its config, state directory and socket."""

    home: Path  # in the cluster directory
    store: Path = IMAGE_STORE

    @property
    def config(self) -> Path:
        return self.home / "config.toml"

    @property
    def state(self) -> Path:
        return self.home / "state"

    @property
    def socket(self) -> Path:
        return self.home / "containerd.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"


def config_toml(containerd: Containerd, sandbox_image: str, cni_bin: Path, cni_conf: Path) -> str:
    """containerd 1.6 config (version 2): private paths, CRI with the local pause image and the pod network's CNI."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{containerd.store}"
state = "{containerd.state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{containerd.socket}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{containerd.home / "opt"}"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # This machine's root lacks CAP_SYS_RESOURCE: runc may not lower oom_score_adj (sandboxes would fail to start).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{containerd.state / "runc"}"

[{cri}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""


def argv(containerd: Containerd) -> list[str]:
    return ["/usr/bin/containerd", f"--config={containerd.config}"]


def environment() -> dict[str, str]:
    """containerd's environment: the refusing proxy for every registry (pulls fail here, fast)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HTTP_PROXY": NO_PULL_PROXY,
        "HTTPS_PROXY": NO_PULL_PROXY,
        "NO_PROXY": "",
    }


def ctr(containerd: Containerd, *args: str, timeout_s: float = 600.0) -> str:
    """Runs `ctr` against this containerd in the CRI namespace; returns stdout."""
    command = ["ctr", f"--address={containerd.socket}", f"--namespace={NAMESPACE}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout


def crictl(containerd: Containerd, crictl_bin: Path, *args: str, timeout_s: float = 120.0) -> str:
    """Runs `crictl` against this containerd's CRI; returns stdout."""
    command = [str(crictl_bin), f"--runtime-endpoint={containerd.endpoint}", "--timeout=60s", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise ClusterError(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout


def import_image(containerd: Containerd, archive: Path) -> None:
    """Imports an image archive (docker-archive or OCI) into the CRI namespace, unpacked for the snapshotter."""
    ctr(containerd, "images", "import", "--no-unpack=false", str(archive))
