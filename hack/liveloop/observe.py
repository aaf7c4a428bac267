"""What Prometheus says about a serving: per-GPU load, balancedness, expert-load skew and expert bytes moved.

The same series and the same balancedness the EPLB controller plans from (k2_eplb.prometheus_reader, k2_eplb.load),
evaluated at a chosen time, so that a window before a rebalance and one after it can be compared."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from k2_api.contract import MetricLabels, Metrics
from k2_eplb.load import measured_balancedness
from k2_eplb.prometheus_reader import http_get, parse_vector, selector

Rows = list[tuple[dict[str, str], float]]


@dataclass(frozen=True)
class Prometheus:
    url: str
    timeout_s: float = 10.0

    def query(self, promql: str, at: float | None = None) -> Rows:
        """An instant query, evaluated at Unix time `at` (now when None)."""
        params = {"query": promql} | ({"time": f"{at:.3f}"} if at is not None else {})
        return parse_vector(
            http_get(f"{self.url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode(params)}", self.timeout_s)
        )


@dataclass(frozen=True)
class ServingSeries:
    """The series of one serving in one Prometheus."""

    prometheus: Prometheus
    serving: str
    namespace: str

    @property
    def sel(self) -> str:
        return selector({MetricLabels.SERVING: self.serving, "namespace": self.namespace})

    def _increase(self, metric: str, by: tuple[str, ...], window_s: int, at: float | None) -> Rows:
        return self.prometheus.query(f"sum by ({', '.join(by)}) (increase({metric}{self.sel}[{window_s}s]))", at)

    def gpu_loads(self, window_s: int, at: float | None = None) -> dict[tuple[int, int], float]:
        """Tokens each (group, rank) processed in its expert slots over the window ending at `at`."""
        group, rank = MetricLabels.GROUP, MetricLabels.RANK
        rows = self._increase(Metrics.SLOT_TOKENS.name, (group, rank), window_s, at)
        return {(int(labels[group]), int(labels[rank])): value for labels, value in rows}

    def balancedness(self, window_s: int, at: float | None = None) -> float | None:
        """Mean over (group, layer) of mean/max rank load: what the controller reports as measuredBalancedness."""
        group, rank, layer = MetricLabels.GROUP, MetricLabels.RANK, MetricLabels.LAYER
        rows = self._increase(Metrics.SLOT_TOKENS.name, (group, rank, layer), window_s, at)
        return measured_balancedness({(s[group], s[rank], int(s[layer])): value for s, value in rows})

    def expert_skew(self, window_s: int, at: float | None = None) -> float | None:
        """Max over layers of (hottest expert's tokens / mean expert tokens); 1.0 is uniform."""
        layer, expert = MetricLabels.LAYER, MetricLabels.EXPERT
        rows = self._increase(Metrics.EXPERT_TOKENS.name, (layer, expert), window_s, at)
        per_layer: dict[str, list[float]] = {}
        for labels, value in rows:
            per_layer.setdefault(labels[layer], []).append(value)
        ratios = [max(v) / (sum(v) / len(v)) for v in per_layer.values() if sum(v) > 0]
        return max(ratios) if ratios else None

    def weight_bytes(self) -> dict[str, float]:
        """Expert-weight bytes the ranks took in so far, by source (peer, storage)."""
        source = MetricLabels.SOURCE
        rows = self.prometheus.query(f"sum by ({source}) ({Metrics.EXPERT_WEIGHT_BYTES.name}{self.sel})")
        return {labels.get(source, ""): value for labels, value in rows}


def bars(loads: Mapping[tuple[int, int], float], width: int = 40) -> list[str]:
    """One terminal bar per GPU, scaled to the busiest: `g0 r1 ████████▌        1234 tok`."""
    if not loads:
        return ["(no load yet)"]
    top = max(loads.values()) or 1.0
    eighths = " ▏▎▍▌▋▊▉█"
    lines = []
    for (group, rank), tokens in sorted(loads.items()):
        filled = tokens / top * width
        whole, part = int(filled), int((filled - int(filled)) * 8)
        bar = "█" * whole + (eighths[part] if whole < width and part else "")
        lines.append(f"g{group} r{rank} {bar:<{width}} {tokens:8.0f} tok")
    return lines
