"""Prometheus metrics of rank 0's continuously batched engine: its queue, its batch, its paged cache and latencies.

Gauges are read from the engine when scraped; the latencies are histograms the engine's decoding thread feeds
(`LatencyStats`): time to first token (from the request's arrival to its first token) and time per output token
(a finished request's decode time over its tokens after the first). Every sample carries the rank's
`serving`, `group` and `rank` labels, as the expert-load counters do (`k2_workers.serve.metrics`).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from k2_api.contract import MetricLabels, MetricSpec

if TYPE_CHECKING:
    from k2_workers.serve.engine import GroupEngine

_RANK = (MetricLabels.SERVING, MetricLabels.GROUP, MetricLabels.RANK)
CACHE_STATE: Final = "state"  # the label of the cache-block gauge: "used" or "free"
TTFT_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class EngineMetrics:
    """The engine's metric names (candidates for `k2_api.contract`, beside `Metrics`)."""

    QUEUED: Final = MetricSpec("k2_serving_queued_requests", _RANK, "Requests in the queue, not yet in the batch.")
    WAITING: Final = MetricSpec(
        "k2_serving_waiting_sequences", _RANK, "Sequences waiting to run: queued, or preempted and waiting again."
    )
    RUNNING: Final = MetricSpec("k2_serving_running_sequences", _RANK, "Sequences in the running batch.")
    CACHE_BLOCKS: Final = MetricSpec(
        "k2_serving_cache_blocks", (*_RANK, CACHE_STATE), "Blocks of the paged cache, by state (used or free)."
    )
    CACHE_CAPACITY: Final = MetricSpec(
        "k2_serving_cache_capacity_tokens", _RANK, "Tokens the paged cache holds when full."
    )
    PREEMPTIONS: Final = MetricSpec(
        "k2_serving_preemptions_total", _RANK, "Sequences preempted for cache blocks (recomputed later)."
    )
    PREFIX_BLOCKS: Final = MetricSpec(
        "k2_serving_prefix_reused_blocks_total", _RANK, "Cache blocks taken from a shared prefix, not computed."
    )
    TTFT: Final = MetricSpec(
        "k2_serving_time_to_first_token_seconds", _RANK, "From a request's arrival to its first token."
    )
    TPOT: Final = MetricSpec(
        "k2_serving_time_per_output_token_seconds", _RANK, "A request's decode time over its tokens after the first."
    )


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


class EngineCollector(Collector):
    """The engine's metrics, labelled with its rank's serving, group and rank."""

    def __init__(self, engine: GroupEngine, serving: str, group: str | int) -> None:
        self.engine = engine
        self.labels = [serving, str(group), str(engine.rank)]

    def collect(self) -> Iterator[Metric]:
        engine, labels = self.engine, self.labels
        queued, preempted = engine.scheduler.queued_requests, len(engine.batcher.preempted)
        yield _gauge(EngineMetrics.QUEUED, labels, queued)
        yield _gauge(EngineMetrics.WAITING, labels, queued + preempted)
        yield _gauge(EngineMetrics.RUNNING, labels, len(engine.batcher.running))
        blocks = GaugeMetricFamily(
            EngineMetrics.CACHE_BLOCKS.name,
            EngineMetrics.CACHE_BLOCKS.help,
            labels=list(EngineMetrics.CACHE_BLOCKS.labels),
        )
        blocks.add_metric([*labels, "used"], float(engine.blocks.used))
        blocks.add_metric([*labels, "free"], float(engine.blocks.free))
        yield blocks
        yield _gauge(EngineMetrics.CACHE_CAPACITY, labels, engine.blocks.capacity_tokens)
        yield _counter(EngineMetrics.PREEMPTIONS, labels, engine.batcher.preemptions)
        yield _counter(EngineMetrics.PREFIX_BLOCKS, labels, engine.blocks.reused_blocks)
        yield from engine.latency.families(labels)


def _gauge(spec: MetricSpec, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    family.add_metric(labels, float(value))
    return family


def _counter(spec: MetricSpec, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(spec.family, spec.help, labels=list(spec.labels))
    family.add_metric(labels, float(value))
    return family
