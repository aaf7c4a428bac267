"""Runs `k2 operator run` as a subprocess against the local control plane."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster
from tests.support.paths import ROOT
from tests.support.ports import free_port
from tests.support.waits import wait_for

RESYNC_SECONDS = 1.0


class Operator:
    """One operator process watching one namespace; `kill()` is SIGKILL, `start()` starts a fresh one."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        resync_s: float = RESYNC_SECONDS,
    ) -> None:
        self.cluster, self.namespace, self.log_dir, self.resync_s = cluster, namespace, log_dir, resync_s
        self.env = {**cluster.env, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    def start(self, apply_delay_s: float = 0.0) -> None:
        """Starts the operator; `apply_delay_s` slows every server-side apply down (to catch it mid-reconcile)."""
        self.port = free_port()
        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        args = ["--namespace", self.namespace, "--standalone"]
        args += ["--metrics-port", str(self.port), "--metrics-address", "127.0.0.1"]
        args += ["--resync-seconds", str(self.resync_s)]
        # The operator on the real adapter, wrapped by tests.support.slow_kube when apply_delay_s > 0.
        argv = [sys.executable, "-m", "tests.support.slow_operator", "--apply-delay", str(apply_delay_s), "--", *args]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        wait_for("the operator's /healthz", self.healthy, timeout_s=30)

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as answer:
            text: str = answer.read().decode()
            return text

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in sorted(self.log_dir.glob("operator-*.log")))

    def errors(self) -> list[str]:
        """Tracebacks and ERROR lines, except kopf's own retried requests ("... failed; will retry"): the API server
        answers 429 "storage is (re)initializing" for a while after a CRD changes, and kopf retries by design."""
        return [
            line
            for line in self.logs().splitlines()
            if ("Traceback" in line or " ERROR " in line) and "failed; will retry" not in line
        ]


@contextmanager
def running_operator(
    cluster: Cluster, namespace: str, log_dir: Path, env: dict[str, str] | None = None, resync_s: float = RESYNC_SECONDS
) -> Iterator[Operator]:
    operator = Operator(cluster, namespace, log_dir, env, resync_s)
    operator.start()
    try:
        yield operator
    except BaseException:
        sys.stderr.write(f"--- operator logs ---\n{operator.logs()}\n")
        raise
    finally:
        operator.stop()


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
