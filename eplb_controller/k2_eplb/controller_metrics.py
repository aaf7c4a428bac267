"""The EPLB controller's own Prometheus metrics, on a registry of its own (tests read them without global state),
and its liveness; `serve` puts both on HTTP (/metrics, /healthz)."""

from __future__ import annotations

import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge

from k2_api.metrics_server import serve_metrics
from k2_eplb.planner import Decision

_LABELS = ("serving", "namespace")


class ControllerMetrics:
    """Gauges per serving for the last pass, counters for what the controller did."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.balancedness = Gauge(
            "k2_eplb_balancedness",
            "Balancedness of the placement in force: measured from slot counters, else estimated on the newest load.",
            _LABELS,
            registry=r,
        )
        self.predicted = Gauge(
            "k2_eplb_predicted_balancedness",
            "Balancedness the planner predicted for its last solve.",
            _LABELS,
            registry=r,
        )
        self.staleness = Gauge(
            "k2_eplb_staleness", "Balancedness of the current placement on the newest load window.", _LABELS, registry=r
        )
        self.rebalances = Counter("k2_eplb_rebalances", "Placement generations written.", _LABELS, registry=r)
        self.moved_experts = Counter("k2_eplb_moved_experts", "Expert copies planned.", _LABELS, registry=r)
        self.moved_bytes = Counter(
            "k2_eplb_moved_bytes", "Bytes of expert weights planned to move.", _LABELS, registry=r
        )
        self.skipped = Counter(
            "k2_eplb_skipped", "Planning passes that wrote nothing, by reason.", (*_LABELS, "reason"), registry=r
        )
        self.errors = Counter("k2_eplb_errors", "Planning passes that failed with an error.", _LABELS, registry=r)
        self.pass_errors = Counter(
            "k2_eplb_pass_errors", "Passes that could not list the K2Servings (API server errors).", registry=r
        )

    def observe(self, serving: str, namespace: str, decision: Decision) -> None:
        labels = (serving, namespace)
        current = decision.measured_balancedness if decision.measured_balancedness is not None else decision.staleness
        if current is not None:
            self.balancedness.labels(*labels).set(current)
        if decision.staleness is not None:
            self.staleness.labels(*labels).set(decision.staleness)
        if decision.predicted_balancedness is not None:
            self.predicted.labels(*labels).set(decision.predicted_balancedness)
        if decision.writes:  # a rebalance or a reshape
            self.rebalances.labels(*labels).inc()
            self.moved_experts.labels(*labels).inc(decision.moved_experts)
            self.moved_bytes.labels(*labels).inc(decision.moved_bytes)
        else:
            self.skipped.labels(*labels, decision.reason.value).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """The current value of one sample (for tests and logs)."""
        return self.registry.get_sample_value(name, labels)


class Liveness:
    """Alive while the loop completes a pass at least every `max_age_s` seconds; starting counts as one."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic):
        if max_age_s <= 0:
            raise ValueError(f"max_age_s: {max_age_s} must be > 0")
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """A pass completed (whatever its outcome: an API outage is not a stuck loop)."""
        self._last = self._clock()

    def problem(self) -> str | None:
        """Why the loop counts as stuck, or None while it is alive."""
        age = self._clock() - self._last
        if age <= self.max_age_s:
            return None
        return f"no pass completed for {age:.0f}s (limit {self.max_age_s:.0f}s): the loop is stuck"


def serve(metrics: ControllerMetrics, liveness: Liveness, port: int, address: str = "0.0.0.0") -> ThreadingHTTPServer:
    """/metrics and /healthz (200, or 503 with the reason when the loop is stuck) in a daemon thread."""
    return serve_metrics(metrics.registry, port, address, problem=liveness.problem, thread_name="eplb-metrics")
