"""Prometheus metrics of a training run, served by rank 0 (port 0 disables them; -1 picks a free port).

Names, labels and help texts are `k2_api.contract.TrainingMetrics`; the HTTP endpoint (/metrics and /healthz) is the
control plane's shared one, `k2_api.metrics_server.serve_metrics`.
"""

from __future__ import annotations

import os
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge

from k2_api.contract import Env, MetricLabels, MetricSpec, TrainingMetrics
from k2_api.metrics_server import serve_metrics


class TrainMetrics:
    """One registry per run (not the process-global one), so tests can build several."""

    def __init__(self, training: str, port: int = 0, addr: str | None = None, steps: int | None = None) -> None:
        """`addr` default: $K2_LISTEN_HOST, else every interface."""
        self.registry = CollectorRegistry()
        self._labels = {MetricLabels.TRAINING: training}

        def gauge(spec: MetricSpec) -> Gauge:
            return Gauge(spec.name, spec.help, spec.labels, registry=self.registry)

        def counter(spec: MetricSpec) -> Counter:
            return Counter(spec.family, spec.help, spec.labels, registry=self.registry)

        self.step = gauge(TrainingMetrics.STEP)
        self.steps = gauge(TrainingMetrics.STEPS)
        self.loss = gauge(TrainingMetrics.LOSS)
        self.lr = gauge(TrainingMetrics.LEARNING_RATE)
        self.step_seconds = gauge(TrainingMetrics.STEP_SECONDS)
        self.tokens_per_second = gauge(TrainingMetrics.TOKENS_PER_SECOND)
        self.max_attention_logit = gauge(TrainingMetrics.MAX_ATTENTION_LOGIT)
        self.clipped_heads = gauge(TrainingMetrics.QK_CLIPPED_HEADS)
        self.grad_norm = gauge(TrainingMetrics.GRAD_NORM)
        self.last_checkpoint_step = gauge(TrainingMetrics.LAST_CHECKPOINT_STEP)
        self.tokens = counter(TrainingMetrics.TOKENS)
        self.expert_tokens = counter(TrainingMetrics.EXPERT_TOKENS)
        if steps is not None:
            self.steps.labels(**self._labels).set(steps)
        self._server: ThreadingHTTPServer | None = None
        if port:
            host = addr or os.environ.get(Env.LISTEN_HOST, "0.0.0.0")
            self._server = serve_metrics(self.registry, max(port, 0), host, thread_name="k2-train-metrics")

    @property
    def port(self) -> int | None:
        """The port metrics are served on (None when off)."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_step(self, record: dict[str, float], num_tokens: int, expert_counts: list[list[float]] | None) -> None:
        """One step's JSON record (`step_s` is optional: records of older callers lack it)."""
        labels = self._labels
        self.step.labels(**labels).set(record["step"])
        self.loss.labels(**labels).set(record["loss"])
        self.lr.labels(**labels).set(record["lr"])
        if "step_s" in record:
            self.step_seconds.labels(**labels).set(record["step_s"])
        self.tokens_per_second.labels(**labels).set(record["tokens_per_s"])
        self.max_attention_logit.labels(**labels).set(record["max_attn_logit"])
        self.clipped_heads.labels(**labels).set(record["clipped_heads"])
        self.grad_norm.labels(**labels).set(record["grad_norm"])
        self.tokens.labels(**labels).inc(num_tokens)
        for layer, row in enumerate(expert_counts or []):
            for expert, count in enumerate(row):
                if count:
                    where = {MetricLabels.LAYER: str(layer), MetricLabels.EXPERT: str(expert)}
                    self.expert_tokens.labels(**labels, **where).inc(count)

    def observe_checkpoint(self, step: int) -> None:
        self.last_checkpoint_step.labels(**self._labels).set(step)
