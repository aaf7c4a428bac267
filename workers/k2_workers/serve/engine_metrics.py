"""Prometheus metrics of rank 0's continuously batched engine: its queue, its batch, its paged cache and latencies.

Gauges are read from the engine when scraped; the latencies are histograms the engine's decoding thread feeds
(`latency.LatencyStats`): time to first token (from the request's arrival to its first token) and time per output token
(a finished request's decode time over its tokens after the first). Every sample carries the rank's
`serving`, `group` and `rank` labels, as the expert-load counters do (`k2_workers.serve.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from k2_api.contract import EngineMetrics, MetricSpec

if TYPE_CHECKING:
    from k2_workers.serve.engine import GroupEngine


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
