"""Mounts and cgroups the real node leaves on the host: find them, and remove them once nothing runs there."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAME = "k8s.io"  # containerd's CRI puts each pod and container under this cgroup in every hierarchy
# containerd 1.6 keeps shim sockets in /run/containerd/s whatever its config says; CNI adds /run/netns.
RUNTIME_DIRS = (Path("/run/containerd"), Path("/run/netns"))


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points(mountinfo: str, roots: tuple[Path, ...]) -> list[Path]:
    """The mount points in `mountinfo` (/proc/self/mountinfo text) at or below any of `roots`, deepest first."""
    found: set[Path] = set()
    for line in mountinfo.splitlines():
        point = Path(_unescape(line.split()[4]))
        if any(point == root or root in point.parents for root in roots):
            found.add(point)
    return sorted(found, key=lambda p: (len(p.parts), str(p)), reverse=True)


def mounts_under(*roots: Path) -> list[Path]:
    """This machine's mount points at or below any of `roots`, deepest first."""
    return mount_points(Path("/proc/self/mountinfo").read_text(), roots)


def unmount_under(*roots: Path) -> None:
    """Unmounts everything below `roots` (a mount may be stacked: repeat until none is left)."""
    for _ in range(5):
        points = mounts_under(*roots)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", str(point)], capture_output=True, check=False)
    for point in mounts_under(*roots):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def pod_cgroups() -> list[Path]:
    """Every cgroup directory under CGROUP_NAME in each hierarchy, deepest first."""
    found: list[Path] = []
    for top in CGROUP_ROOT.glob(f"*/{CGROUP_NAME}"):
        found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def kill_and_remove_cgroups() -> None:
    """SIGKILLs any process left in the pod cgroups, then removes the cgroups (rmdir, deepest first)."""
    for cgroup in pod_cgroups():
        with contextlib.suppress(OSError):
            for pid in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for cgroup in pod_cgroups():
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def remove_runtime_dirs() -> None:
    """Removes the empty directories under RUNTIME_DIRS, and those too when empty (another runtime's stay)."""
    for top in RUNTIME_DIRS:
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
            with contextlib.suppress(OSError):
                Path(directory).rmdir()


def leftovers(*roots: Path) -> list[str]:
    """Mounts under `roots` and pod cgroups still here (empty after a clean teardown)."""
    found = [f"mount {p}" for p in mounts_under(*roots)]
    found += [f"cgroup {p}" for p in pod_cgroups()]
    return found
