"""The operator's Prometheus metrics (served on --metrics-port together with /healthz)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

REGISTRY = CollectorRegistry()
RECONCILES = Counter(
    "k2_operator_reconciles_total",
    "Reconciles by kind and result (ok or error).",
    ["kind", "result"],
    registry=REGISTRY,
)
ERRORS = Counter("k2_operator_reconcile_errors_total", "Reconciles that raised, by kind.", ["kind"], registry=REGISTRY)
DURATION = Histogram(
    "k2_operator_reconcile_duration_seconds",
    "Wall time of one reconcile, by kind.",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STATUS_WRITES = Counter(
    "k2_operator_status_writes_total",
    "Status subresource writes, by kind (0 for a steady resource).",
    ["kind"],
    registry=REGISTRY,
)


@contextmanager
def observe(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILES.labels(kind, "error").inc()
        ERRORS.labels(kind).inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - started)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            body, content_type = generate_latest(REGISTRY), CONTENT_TYPE_LATEST
        elif self.path.startswith("/healthz"):
            body, content_type = b"ok\n", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def serve(port: int, address: str = "0.0.0.0") -> ThreadingHTTPServer:
    """/metrics and /healthz on `address:port` in a daemon thread."""
    server = ThreadingHTTPServer((address, port), _Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
