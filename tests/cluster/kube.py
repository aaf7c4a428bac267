"""Small kubectl helpers for the control-plane tests: apply a manifest, read an object, wait for a condition."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tests.conftest import Cluster

T = TypeVar("T")
WAIT_TIMEOUT_S = 60.0


def apply(cluster: Cluster, manifest: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """Creates or updates one object server-side and returns it as the server stored it."""
    args = ["apply", "--server-side", "--field-manager=k2-tests", "-f", "-", "-o", "json"]
    if namespace is not None:
        args += ["-n", namespace]
    result: dict[str, Any] = json.loads(cluster.kubectl(*args, input=json.dumps(manifest)).stdout)
    return result


def get(cluster: Cluster, *args: str) -> Any:
    """`kubectl get ARGS -o json`, decoded."""
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def exists(cluster: Cluster, *args: str) -> bool:
    result = cluster.kubectl("get", *args, "--ignore-not-found", "-o", "name", check=False)
    assert result.returncode == 0, result.stderr
    return bool(result.stdout.strip())


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_TIMEOUT_S) -> T:
    """Polls `probe` until it returns something truthy and returns it; fails naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.25)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """The status condition of the given type, if present."""
    for item in obj.get("status", {}).get("conditions", []):
        if item.get("type") == type_:
            return dict(item)
    return None


def container(name: str = "main", gpus: int | None = None, **extra: Any) -> dict[str, Any]:
    """A container spec; the image is never pulled (kwok runs nothing)."""
    spec: dict[str, Any] = {"name": name, "image": "registry.invalid/k2/worker:test", **extra}
    if gpus is not None:
        spec["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return spec


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(cluster, "pods", "-n", namespace, "-l", selector)["items"]
    return items


def is_ready(pod: dict[str, Any]) -> bool:
    ready = condition(pod, "Ready")
    return pod.get("status", {}).get("phase") == "Running" and ready is not None and ready["status"] == "True"
