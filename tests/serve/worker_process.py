"""Start `k2 worker serve` processes on loopback for the serving tests, and talk to them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def request(url: str, body: dict[str, Any] | bytes | None = None, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def request_with_headers(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST `body`: the status, the JSON answer and the headers."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def wait_healthy(url: str, process: subprocess.Popen[str], timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"worker exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}"
            )
        try:
            status, body = request(url + "/healthz", timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


@contextmanager
def serve_processes(
    argv_per_process: list[list[str]], env_per_process: list[dict[str, str]]
) -> Iterator[list[subprocess.Popen[str]]]:
    processes = []
    try:
        for argv, env in zip(argv_per_process, env_per_process, strict=True):
            full_env = {**os.environ, "K2_COLLECTIVE_TIMEOUT_S": "60", **env}
            full_env.pop("KUBERNETES_SERVICE_HOST", None)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "k2_workers.serve", "--host", "127.0.0.1", "--grpc-port", "0", *argv],
                    env=full_env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_placement(path: Path, generation: int, layers: list[list[list[int]]], num_experts: int) -> None:
    document = {
        "generation": generation,
        "numLayers": len(layers),
        "numExperts": num_experts,
        "ranks": len(layers[0]),
        "slotsPerRank": len(layers[0][0]),
        "layers": [{"layer": i, "slots": slots} for i, slots in enumerate(layers)],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)  # atomic, like a ConfigMap volume update


def wait_until(url: str, predicate: Any, timeout_s: float = 60) -> dict[str, Any]:
    """GET `url` until `predicate(body)` holds; the last body otherwise (the caller's assertion then fails)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = request(url, timeout=10)
        if (status == 200 and predicate(body)) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)
