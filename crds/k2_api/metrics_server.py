"""The control plane's `/metrics` and `/healthz` endpoint, shared by the operator and the EPLB controller.

`/healthz` answers 200 `ok`, or 503 with the reason that `problem()` returns (for example a loop that has not
completed a pass for too long), so a liveness probe restarts a process that is stuck rather than merely slow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from k2_api.contract import HttpPaths

METRICS_PATH = "/metrics"


def _healthy() -> str | None:
    return None


def serve_metrics(
    registry: CollectorRegistry,
    port: int,
    address: str = "0.0.0.0",
    problem: Callable[[], str | None] = _healthy,
    thread_name: str = "metrics",
) -> ThreadingHTTPServer:
    """Serves `registry` on /metrics and `problem()` on /healthz at `address:port`, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS_PATH:
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == HttpPaths.HEALTHZ:
                reason = problem()
                self._answer(503 if reason else 200, f"{reason or 'ok'}\n".encode(), "text/plain; charset=utf-8")
            else:
                self.send_error(404)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=thread_name, daemon=True).start()
    return server
