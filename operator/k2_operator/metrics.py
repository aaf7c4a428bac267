"""The operator's Prometheus metrics (served on --metrics-port together with /healthz)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram

from k2_api.metrics_server import serve_metrics

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

CHILD_APPLIES = Counter(
    "k2_operator_child_applies_total",
    "Children a reconcile wanted in place, by kind and result: applied, or unchanged (not applied: still as the "
    "operator's last apply left it; all of them for a steady resource).",
    ["kind", "result"],
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


def serve(port: int, address: str = "0.0.0.0") -> ThreadingHTTPServer:
    """/metrics and /healthz on `address:port` in a daemon thread."""
    return serve_metrics(REGISTRY, port, address)
