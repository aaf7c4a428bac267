"""kubectl and helm for the live loop: one thin wrapper, every failure an error that carries kubectl's message."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")


class KubectlError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path
    binary: Path
    helm_binary: Path

    def run(self, *args: str, input: str | None = None, timeout_s: float = 120.0) -> str:
        argv = [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout_s, check=False)
        if result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def get(self, *args: str, namespace: str) -> Any:
        return json.loads(self.run("get", f"--namespace={namespace}", *args, "-o", "json"))

    def apply(self, manifest: Mapping[str, Any], namespace: str) -> None:
        self.run(
            "apply",
            "--server-side",
            "--field-manager=k2-live-loop",
            f"--namespace={namespace}",
            "-f",
            "-",
            input=json.dumps(manifest),
        )

    def helm(self, *args: str, timeout_s: float = 300.0) -> str:
        argv = [str(self.helm_binary), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        if result.returncode != 0:
            raise KubectlError(f"helm {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, remote_port: int | str) -> Iterator[int]:
        """`kubectl port-forward TARGET :REMOTE` on 127.0.0.1; yields the local port, stops the forward at the end."""
        argv = [
            str(self.binary),
            f"--kubeconfig={self.kubeconfig}",
            "port-forward",
            f"--namespace={namespace}",
            "--address=127.0.0.1",
            target,
            f":{remote_port}",
        ]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            match = FORWARDING.search(first)
            if match is None:
                rest = first + (process.stdout.read() if process.poll() is not None else "")
                raise KubectlError(f"kubectl port-forward {target}: {rest.strip()}")
            # kubectl logs every connection on stdout: drain it, or a full pipe stalls the forward.
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            yield int(match.group(1))
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass
