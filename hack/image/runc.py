"""Run a command in the built image with runc, the way a restricted pod does: non-root, read-only root, /tmp tmpfs.

    python hack/image run [--uid UID] -- k2 --help

The root filesystem is the cached layers stacked as a read-only overlay (no upper directory), mounted in a private
mount namespace that ends with the command. No containerd is needed. Needs root (runc, mounts).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .layers import LayerCache
from .spec import ENV, UID, WORKDIR

_CAPABILITIES: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}

PROG = "hack/image run"


def runtime_spec(args: list[str], uid: int, env: dict[str, str], cwd: str) -> dict[str, Any]:
    """An OCI runtime spec like a Pod Security "restricted" container's: no capabilities, read-only root."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": uid},
            "args": args,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": _CAPABILITIES,
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "k2-image-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            # The pods' emptyDir at /tmp (operator/k2_operator/builders/common.py writable_tmp).
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def run(lowers: list[Path], args: list[str], uid: int = UID, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `args` in the image whose layer directories are `lowers` (topmost first); returns the finished process."""
    with tempfile.TemporaryDirectory(prefix="k2-runc-") as tmp:
        bundle = Path(tmp)
        (bundle / "rootfs").mkdir()
        (bundle / "config.json").write_text(json.dumps(runtime_spec(args, uid, ENV, WORKDIR)))
        lower = ":".join(str(p) for p in lowers)
        rootfs = shlex.quote(str(bundle / "rootfs"))
        script = (
            "set -e; mount --make-rprivate /;"
            f" mount -t overlay overlay -o ro,lowerdir={shlex.quote(lower)} {rootfs};"
            f" exec runc --root {shlex.quote(str(bundle / 'state'))} run --bundle {shlex.quote(str(bundle))}"
            f" k2-image-{uuid.uuid4().hex[:8]}"
        )
        command = ["unshare", "--mount", "--fork", "/bin/sh", "-c", script]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    from . import builder  # the layer cache

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--uid", type=int, default=UID)
    parser.add_argument("--cache", type=Path, default=builder.default_cache())
    parser.add_argument("args", nargs="+")
    options = parser.parse_args(argv)
    with LayerCache(options.cache).locked(shared=True):
        done = run(builder.cached_lowers(options.cache), options.args, options.uid)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode
