"""kubectl helpers with one behaviour for every test: read, list, apply, patch, and status conditions.

Every call raises `KubectlError` when kubectl fails. The one exception is explicit: `get(..., missing_ok=True)`
returns None for an object that does not exist, and `has_condition` (a polling predicate) treats a missing object as
"not yet". `namespace=None` addresses cluster-scoped objects (or the kubeconfig's default namespace).
"""

from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from tests.support.cluster import Cluster
from tests.support.paths import ROOT, TOOLS_BIN

FIELD_MANAGER = "k2-tests"


def _namespaced(namespace: str | None) -> list[str]:
    return [] if namespace is None else [f"--namespace={namespace}"]


def get(cluster: Cluster, *args: str, namespace: str | None = None, missing_ok: bool = False) -> Any:
    """`kubectl get ARGS -o json`, decoded; with `missing_ok`, None when the object does not exist."""
    argv = ["get", *_namespaced(namespace), *args, "-o", "json"]
    if missing_ok:
        argv.append("--ignore-not-found")  # kubectl then prints nothing for a missing object
    stdout = cluster.kubectl(*argv).stdout
    if not stdout.strip():
        assert missing_ok, f"kubectl {' '.join(argv)} printed nothing"
        return None
    return json.loads(stdout)


def items(
    cluster: Cluster, kinds: str, *, namespace: str | None = None, selector: str | None = None
) -> list[dict[str, Any]]:
    """The objects of `kinds` (one kind, or several comma-separated), optionally filtered by a label selector."""
    args = [kinds] + ([f"--selector={selector}"] if selector else [])
    return list(get(cluster, *args, namespace=namespace)["items"])


def exists(cluster: Cluster, *args: str, namespace: str | None = None) -> bool:
    """Whether `kubectl get ARGS` finds the object."""
    stdout = cluster.kubectl("get", *_namespaced(namespace), *args, "--ignore-not-found", "-o", "name").stdout
    return bool(stdout.strip())


def apply(cluster: Cluster, manifest: Mapping[str, Any] | str, *, namespace: str | None = None) -> Any:
    """Creates or updates objects server-side (field manager `k2-tests`) and returns what the server stored.

    `manifest` is one object, or YAML/JSON text that may hold several documents (then a v1 List comes back).
    """
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    argv = ["apply", *_namespaced(namespace), "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-"]
    return json.loads(cluster.kubectl(*argv, "-o", "json", input=text).stdout)


def patch(
    cluster: Cluster,
    ref: str,
    body: Mapping[str, Any],
    *,
    namespace: str | None = None,
    subresource: str | None = None,
) -> dict[str, Any]:
    """A JSON merge patch of `ref` (`kind/name`), or of its `subresource`; returns the patched object."""
    argv = ["patch", *_namespaced(namespace), ref, "--type=merge", "-p", json.dumps(body), "-o", "json"]
    if subresource:
        argv.append(f"--subresource={subresource}")
    result: dict[str, Any] = json.loads(cluster.kubectl(*argv).stdout)
    return result


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    """The status condition of the given type, if present."""
    for entry in obj.get("status", {}).get("conditions", []):
        if entry.get("type") == type_:
            return dict(entry)
    return None


def has_condition(
    cluster: Cluster, ref: str, type_: str, status: str = "True", *, namespace: str | None = None
) -> dict[str, Any] | None:
    """The object `ref` if its condition `type_` has `status`; None otherwise, including while it does not exist."""
    obj = get(cluster, ref, namespace=namespace, missing_ok=True)
    found = None if obj is None else condition(obj, type_)
    return obj if found is not None and found["status"] == status else None


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Whether the pod runs and its Ready condition is True."""
    ready = condition(pod, "Ready")
    return pod.get("status", {}).get("phase") == "Running" and ready is not None and ready["status"] == "True"


@contextlib.contextmanager
def port_forward(cluster: Cluster, namespace: str, target: str, port: int) -> Iterator[str]:
    """`kubectl port-forward TARGET :PORT` on 127.0.0.1, yielding the base URL: the live loop's one implementation
    (hack/liveloop/kubectl.py, which also drains kubectl's per-connection output)."""
    if str(ROOT / "hack") not in sys.path:
        sys.path.insert(0, str(ROOT / "hack"))
    from liveloop.kubectl import Kubectl

    kubectl = Kubectl(cluster.kubeconfig, TOOLS_BIN / "kubectl", TOOLS_BIN / "helm")
    with kubectl.port_forward(namespace, target, port) as local:
        yield f"http://127.0.0.1:{local}"


def post_json(url: str, body: Mapping[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    """POSTs `body` as JSON and returns the decoded answer (an HTTP error raises)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        document: dict[str, Any] = json.loads(answer.read())
        return document
