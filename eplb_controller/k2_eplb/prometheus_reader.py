"""Read per-expert load from Prometheus' HTTP API.

`increase()` over the window does the counter arithmetic, including resets (a worker restart): Prometheus treats any
decrease of a counter as a reset and adds the new value, and extrapolates to the window's edges. Ranks count as
reporting when their series are present at the query instant: a failed scrape makes Prometheus mark the target's
series stale at once, so a rank that went down stops counting within one scrape interval.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from k2_api.contract import MetricLabels, Metrics
from k2_eplb.load import LoadReadError, LoadSample, load_matrix, measured_balancedness

Fetch = Callable[[str, float], bytes]
"""(url, timeout seconds) -> response body."""


def http_get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def selector(labels: Mapping[str, str]) -> str:
    """A PromQL label matcher `{a="x",b="y"}` with the values escaped."""
    escaped = {name: value.replace("\\", "\\\\").replace('"', '\\"') for name, value in labels.items()}
    return "{" + ",".join(f'{name}="{value}"' for name, value in escaped.items()) + "}"


class PrometheusLoadReader:
    """Load of one serving over a window, from the Prometheus at `url` (http://host:port, no trailing path)."""

    def __init__(self, url: str, *, timeout: float = 10.0, fetch: Fetch = http_get):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"prometheusUrl: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._fetch = fetch

    def read(
        self,
        labels: Mapping[str, str],
        *,
        window_seconds: float,
        num_layers: int,
        num_experts: int,
        ranks_expected: int,
    ) -> LoadSample:
        """Tokens per (layer, expert) over the last `window_seconds`, for the series matching `labels`.

        `labels` selects the serving, e.g. {"serving": "k2", "namespace": "prod"}.
        """
        if window_seconds < 1:
            raise ValueError(f"windowSeconds: {window_seconds} must be >= 1")
        sel = selector(labels)
        window = f"[{int(window_seconds)}s]"
        experts, slots = Metrics.EXPERT_TOKENS.name + sel, Metrics.SLOT_TOKENS.name + sel
        group, rank, layer, expert = MetricLabels.GROUP, MetricLabels.RANK, MetricLabels.LAYER, MetricLabels.EXPERT
        load_rows = self.query(f"sum by ({layer}, {expert}) (increase({experts}{window}))")
        load_LE, dropped = load_matrix(
            ((row["metric"], _value(row)) for row in load_rows), num_layers=num_layers, num_experts=num_experts
        )
        ranks = self.query(f"count by ({group}, {rank}) ({experts})")
        samples = self.query(f"min(count_over_time({experts}{window}))")
        slot_rows = self.query(f"sum by ({group}, {rank}, {layer}) (increase({slots}{window}))")
        slot_tokens = {
            (row["metric"].get(group, ""), row["metric"].get(rank, ""), int(row["metric"][layer])): _value(row)
            for row in slot_rows
            if row["metric"].get(layer, "").isdigit()
        }
        return LoadSample(
            load_LE=load_LE,
            ranks_seen=len(ranks),
            ranks_expected=ranks_expected,
            num_samples=int(_value(samples[0])) if samples else 0,
            window_seconds=window_seconds,
            source="prometheus",
            measured_balancedness=measured_balancedness(slot_tokens),
            dropped_series=dropped,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant query; returns the result vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            answer = json.loads(self._fetch(url, self.timeout))
        except (OSError, urllib.error.URLError, ValueError) as error:
            raise LoadReadError(f"prometheus {self.url}: {error}") from error
        if answer.get("status") != "success":
            raise LoadReadError(f"prometheus {self.url}: {answer.get('errorType')}: {answer.get('error')}")
        data = answer["data"]
        if data.get("resultType") != "vector":
            raise LoadReadError(f"prometheus {self.url}: expected a vector, got {data.get('resultType')}")
        result: list[dict[str, Any]] = data["result"]
        return result


def _value(row: Mapping[str, Any]) -> float:
    return float(row["value"][1])
