"""Run a build command as root inside the image's root filesystem, in a private mount namespace.

The layers below are overlayfs lower directories and the layer being built is the upper directory, so the upper
directory ends up holding exactly the layer's own changes (deletions as overlayfs whiteouts). /proc, /dev, a tmpfs
/tmp and the build inputs are mounted only inside the namespace: nothing of them reaches the layer, and every mount
goes away with the namespace, also when the command fails.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASSED_PIP_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES")


@dataclass(frozen=True)
class Stage:
    """One build command: the layers below (topmost first), the layer being built, and what to mount for it."""

    lowers: tuple[Path, ...]
    upper: Path
    scratch: Path
    command: str
    binds: dict[str, Path] = field(default_factory=dict)
    """target inside the image (under /tmp, so no mount point lands in the layer) -> host path, read-only"""
    writable_binds: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def mount_script(stage: Stage) -> str:
    """The shell script that assembles the root filesystem and runs the command in it (run under `unshare -m`)."""
    merged = stage.scratch / "merged"
    m = shlex.quote(str(merged))
    lines = ["set -eu", "mount --make-rprivate /", f"mkdir -p {m}"]
    if stage.lowers:
        work = stage.scratch / "work"
        lower = ":".join(str(p) for p in stage.lowers)
        options = f"lowerdir={lower},upperdir={stage.upper},workdir={work}"
        lines += [f"mkdir -p {shlex.quote(str(work))}", f"mount -t overlay overlay -o {shlex.quote(options)} {m}"]
    else:
        lines.append(f"mount --bind {shlex.quote(str(stage.upper))} {m}")
    lines += [
        f"mount -t proc proc {m}/proc",
        f"mount --rbind /dev {m}/dev",
        f"mount -t tmpfs -o mode=1777 tmpfs {m}/tmp",
    ]
    if Path("/etc/resolv.conf").exists():
        lines.append(f"[ -e {m}/etc/resolv.conf ] && mount --bind -o ro /etc/resolv.conf {m}/etc/resolv.conf")
    for target, source in [*stage.binds.items(), *stage.writable_binds.items()]:
        if not target.startswith("/tmp/"):
            raise ValueError(f"binds: {target} is not under /tmp (its mount point would land in the layer)")
        kind = "-d" if source.is_dir() else "-f"
        t = shlex.quote(f"{merged}{target}")
        make = (
            f"mkdir -p {t}"
            if kind == "-d"
            else f"mkdir -p {shlex.quote(str(Path(f'{merged}{target}').parent))} && touch {t}"
        )
        read_only = " -o ro" if target in stage.binds else ""
        lines += [make, f"mount --bind{read_only} {shlex.quote(str(source))} {t}"]
    env = {"PATH": BUILD_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **stage.env}
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    lines.append(f"exec chroot {m} /usr/bin/env -i {assignments} /bin/sh -euc {shlex.quote(stage.command)}")
    return "\n".join(lines) + "\n"


def pip_env() -> dict[str, str]:
    """The host's pip settings that a build inside the image should follow (index and timeouts)."""
    return {k: os.environ[k] for k in _PASSED_PIP_ENV if k in os.environ}


def run(stage: Stage) -> None:
    """Run the stage; raises CalledProcessError when the command fails."""
    subprocess.run(["unshare", "--mount", "--fork", "/bin/sh", "-c", mount_script(stage)], check=True)
