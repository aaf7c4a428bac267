"""Rank 0's request latencies: time to first token and time per output token, as histograms that the decoding thread
feeds and scrapes read (`engine_metrics`)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from prometheus_client.core import HistogramMetricFamily

from k2_api.contract import EngineMetrics, MetricSpec

TTFT_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bucket

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def family(self, spec: MetricSpec, labels: list[str]) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        family.add_metric(labels, cumulative, self.total)
        return family


class LatencyStats:
    """Time to first token and time per output token, observed by the decoding thread, read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ttft = _Histogram(TTFT_BUCKETS_S)
        self._tpot = _Histogram(TPOT_BUCKETS_S)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.observe(seconds)

    def finished(self, decode_seconds: float, tokens: int) -> None:
        """A request ended after `tokens` tokens, the last `decode_seconds` after its first."""
        if tokens > 1:
            with self._lock:
                self._tpot.observe(decode_seconds / (tokens - 1))

    def families(self, labels: list[str]) -> list[HistogramMetricFamily]:
        with self._lock:
            return [self._ttft.family(EngineMetrics.TTFT, labels), self._tpot.family(EngineMetrics.TPOT, labels)]
