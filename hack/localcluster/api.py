"""HTTP calls to the components on loopback: health endpoints, and admin requests to the apiserver."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .layout import Layout, State


def admin_context(pki: Path) -> ssl.SSLContext:
    """TLS that trusts the cluster CA and presents the admin client certificate."""
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def unverified_context() -> ssl.SSLContext:
    """TLS without verification: kube-controller-manager and kube-scheduler serve /healthz with in-memory certs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def get(url: str, context: ssl.SSLContext | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """GET a loopback URL; (0, "") when nothing answers."""
    assert url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), url
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, ""


def healthz_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    return get(url, context)[0] == 200


def api_request(
    layout: Layout,
    state: State,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    """One admin request to the apiserver; returns (HTTP status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(state.server + path, data=data, method=method)
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, context=admin_context(layout.pki), timeout=10) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as error:
        status, raw = int(error.code), error.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def apiserver_ready(layout: Layout, state: State) -> bool:
    return get(state.server + "/readyz", admin_context(layout.pki))[0] == 200


def list_nodes(layout: Layout, state: State) -> list[dict[str, Any]] | None:
    """Every Node object, or None when the apiserver does not answer."""
    status, body = api_request(layout, state, "GET", "/api/v1/nodes")
    return list(body["items"]) if status == 200 else None


def default_service_account_exists(layout: Layout, state: State) -> bool:
    """True once the controller-manager has made namespace default's ServiceAccount."""
    return api_request(layout, state, "GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
