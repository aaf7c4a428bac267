"""Background processes of one cluster: spawn each in its own process group, recognise ours, stop, wait."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from .errors import ClusterError

START_TIMEOUT_S = 180.0


def cmdline(pid: int) -> list[str]:
    """The argv of process `pid`, or [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").rstrip("\0").split("\0") if raw else []


@dataclass(frozen=True)
class Owner:
    """Recognises the processes of the cluster in `root`: one of `programs`, with `root` in its command line.

    Guards against pid reuse, and never matches other processes that mention the directory (a waiting `up`, pytest).
    """

    root: Path
    programs: Collection[str]

    def owns(self, pid: int) -> bool:
        argv = cmdline(pid)
        return bool(argv) and Path(argv[0]).name in self.programs and f"{self.root}/" in " ".join(argv[1:])

    def live_pids(self) -> list[int]:
        """Every live process of ours (`pgrep -f ROOT`, filtered)."""
        result = subprocess.run(["pgrep", "-f", str(self.root)], capture_output=True, text=True, check=False)
        return [pid for pid in map(int, result.stdout.split()) if self.owns(pid)]


def reap(pid: int) -> bool:
    """Collects the zombie of `pid` when this process started it (the pytest fixture does).

    False only while `pid` is a child of this process that has not exited yet (an exiting child loses its command
    line before it can be reaped, so "no longer ours" alone does not mean it is gone).
    """
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):  # not our child (or already reaped): nothing to wait for here
        return True
    return reaped == pid


def stop_group(pid: int, owner: Owner, grace_s: float) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL whatever is left after `grace_s`."""
    if not owner.owns(pid):
        reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if reap(pid) and not owner.owns(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    time.sleep(0.1)
    reap(pid)


def spawn(argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Starts `argv` in a new session (its own process group), stdout and stderr appended to `log`."""
    if not Path(argv[0]).is_file():
        raise ClusterError(f"{argv[0]} is missing: run `make tools` first")
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def log_tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(
    what: str,
    check: Callable[[], bool],
    name: str,
    log: Path,
    process: subprocess.Popen[bytes] | None,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Polls `check` until true; fails with the tail of `log` when `process` (component `name`) exits or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        tail = f"log: {log}\n--- last lines of {log} ---\n{log_tail(log)}"
        if process is not None and process.poll() is not None:
            raise ClusterError(f"{name} exited with code {process.returncode} while waiting for {what}; {tail}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}; {tail}")
        time.sleep(0.25)
