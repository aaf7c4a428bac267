"""Prometheus metrics a serving rank exports for the EPLB controller (names, labels and help: `k2_api.contract`).

- `k2_expert_tokens_total{serving,group,rank,layer,expert}`: tokens this rank routed to logical expert `expert`.
- `k2_slot_tokens_total{serving,group,rank,layer,slot}`: tokens the expert in slot `slot` of this rank processed.
- `k2_expert_weight_bytes_total{serving,group,rank,source}`: bytes of expert weights this rank took in to apply
  placements, by `source`: `peer` (sent by another rank of the group) or `storage` (read from the checkpoint).

`layer` is the MoE layer's index in `ExpertPlacement.spec.layers` (0-based, dense layers are not counted); `group` is
the expert-parallel group and `rank` the rank inside it. Counts are kept as numpy arrays and turned into samples only
when scraped, so recording a forward pass costs one array addition, not one call per label set. What is counted
when: `k2_workers.serve.load`.

Shapes: L MoE layers, E logical experts, S slots on this rank.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from k2_api.contract import MetricLabels, Metrics, MetricSpec, WeightSources


class ExpertLoadCollector(Collector):
    """Cumulative token counts of one rank, exported as the two counters above."""

    def __init__(self, serving: str, group: str | int, rank: int, num_layers: int, num_experts: int, num_slots: int):
        if num_layers < 1 or num_experts < 1 or num_slots < 1:
            raise ValueError(f"shape: layers {num_layers}, experts {num_experts}, slots {num_slots} must all be >= 1")
        self.labels = {MetricLabels.SERVING: serving, MetricLabels.GROUP: str(group), MetricLabels.RANK: str(rank)}
        self._lock = threading.Lock()
        self._expert_tokens_LE = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._slot_tokens_LS = np.zeros((num_layers, num_slots), dtype=np.float64)
        self._weight_bytes = dict.fromkeys(WeightSources.ALL, 0)

    def add(self, expert_tokens_LE: npt.ArrayLike, slot_tokens_LS: npt.ArrayLike | None = None) -> None:
        """Add one forward pass (or any batch of them): tokens per logical expert and, optionally, per local slot."""
        expert = np.asarray(expert_tokens_LE, dtype=np.float64)
        if expert.shape != self._expert_tokens_LE.shape:
            raise ValueError(f"expert_tokens_LE: shape {expert.shape}, expected {self._expert_tokens_LE.shape}")
        if (expert < 0).any():
            raise ValueError("expert_tokens_LE: counts must be >= 0")
        slot = None if slot_tokens_LS is None else np.asarray(slot_tokens_LS, dtype=np.float64)
        if slot is not None and slot.shape != self._slot_tokens_LS.shape:
            raise ValueError(f"slot_tokens_LS: shape {slot.shape}, expected {self._slot_tokens_LS.shape}")
        if slot is not None and (slot < 0).any():
            raise ValueError("slot_tokens_LS: counts must be >= 0")
        with self._lock:
            self._expert_tokens_LE += expert
            if slot is not None:
                self._slot_tokens_LS += slot

    def add_weight_bytes(self, source: str, nbytes: int) -> None:
        """Count expert-weight bytes taken in from `source` (one of `WeightSources.ALL`)."""
        if source not in self._weight_bytes or nbytes < 0:
            raise ValueError(f"weight bytes: source {source!r} must be one of {WeightSources.ALL}, bytes >= 0")
        with self._lock:
            self._weight_bytes[source] += nbytes

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            expert = self._expert_tokens_LE.copy()
            slot = self._slot_tokens_LS.copy()
            weight_bytes = dict(self._weight_bytes)
        values = list(self.labels.values())
        yield _counter(Metrics.EXPERT_TOKENS, values, expert)
        yield _counter(Metrics.SLOT_TOKENS, values, slot)
        spec = Metrics.EXPERT_WEIGHT_BYTES
        family = CounterMetricFamily(spec.family, spec.help, labels=list(spec.labels))
        for source, nbytes in weight_bytes.items():
            family.add_metric([*values, source], float(nbytes))
        yield family


def _counter(spec: MetricSpec, fixed: list[str], counts: npt.NDArray[np.float64]) -> CounterMetricFamily:
    """One sample per (layer, index) of `counts`, labelled `fixed` plus those two."""
    family = CounterMetricFamily(spec.family, spec.help, labels=list(spec.labels))
    for (layer, index), value in np.ndenumerate(counts):
        family.add_metric([*fixed, str(layer), str(index)], float(value))
    return family


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `close()` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int = 0, address: str = "127.0.0.1") -> MetricsServer:
    """Serve `registry` on http://address:port/metrics (port 0 picks a free one) from a daemon thread."""
    server, thread = start_http_server(port, addr=address, registry=registry)
    return MetricsServer(server, thread)
