"""Read per-expert load by scraping the ranks' /metrics endpoints directly (when no Prometheus is configured).

The reader remembers earlier scrapes of each endpoint and measures the increase from the newest scrape that is at
least a window old (or the oldest it has) to now, summing step by step so that a counter reset in between (a worker
restart: the value goes down) counts the new value as the increase, as Prometheus does. The first read of an endpoint
has one sample only, so the planner refuses it as too few samples; `read_twice` scrapes, waits a window and reads.
"""

from __future__ import annotations

import http.client
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from k2_api.contract import MetricLabels, Metrics
from k2_eplb.load import (
    LoadReadError,
    LoadSample,
    RankKey,
    counter_increase,
    group_load_matrices,
    label_index,
    measured_balancedness,
    merge_groups,
    token_count,
)
from k2_eplb.prometheus_reader import http_get

_TOKEN_COUNTERS = (Metrics.EXPERT_TOKENS.name, Metrics.SLOT_TOKENS.name)

Fetch = Callable[[str, float], str]
"""(url, timeout seconds) -> exposition text."""

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted labels)."""


def http_get_text(url: str, timeout: float) -> str:
    """The page at `url` (redirects are not followed), decoded as UTF-8."""
    return http_get(url, timeout).decode("utf-8")


@dataclass(frozen=True)
class Scrape:
    time: float
    values: dict[SeriesKey, float]


def parse_exposition(text: str, labels: Mapping[str, str]) -> dict[SeriesKey, float]:
    """The k2 token counters in `text` whose labels include `labels`.

    A page that does not parse, or a counter of ours without integer layer and expert (slot) labels or whose value
    is not a finite count, is a LoadReadError: one such page makes the serving's load unusable.
    """
    try:
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    except (ValueError, IndexError, KeyError, TypeError) as error:  # what the text parser raises on bad input
        raise LoadReadError(f"cannot parse the page: {type(error).__name__}: {error}") from None
    values: dict[SeriesKey, float] = {}
    for sample in samples:
        if sample.name not in _TOKEN_COUNTERS:
            continue
        if any(sample.labels.get(name) != value for name, value in labels.items()):
            continue
        what = f"{sample.name}{sample.labels}"
        index = MetricLabels.EXPERT if sample.name == Metrics.EXPERT_TOKENS.name else MetricLabels.SLOT
        label_index(sample.labels, MetricLabels.LAYER, what)
        label_index(sample.labels, index, what)
        values[(sample.name, tuple(sorted(sample.labels.items())))] = token_count(sample.value, what)
    return values


class ScrapeLoadReader:
    """Scrapes endpoints (URLs of /metrics pages) and keeps a short history per endpoint between reads."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        fetch: Fetch = http_get_text,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._sleep = sleep
        self._history: dict[tuple[tuple[tuple[str, str], ...], str], deque[Scrape]] = {}

    def read(
        self,
        labels: Mapping[str, str],
        endpoints: Sequence[str],
        *,
        window_seconds: float,
        num_layers: int,
        num_experts: int,
        ranks_expected: int,
    ) -> LoadSample:
        """Scrape every endpoint now and return the load since the newest scrape at least `window_seconds` old."""
        if window_seconds <= 0:
            raise ValueError(f"windowSeconds: {window_seconds} must be > 0")
        serving_key = tuple(sorted(labels.items()))
        now = self._clock()
        for stale in [key for key in self._history if key[0] == serving_key and key[1] not in endpoints]:
            del self._history[stale]
        expert_series: list[tuple[dict[str, str], float]] = []
        slot_tokens: dict[tuple[str, str, int], float] = {}
        ranks: set[RankKey] = set()
        sample_counts: list[int] = []
        notes: list[str] = []
        for endpoint in endpoints:
            try:
                text = self._fetch(endpoint, self.timeout)
            except (OSError, http.client.HTTPException) as error:  # down, refusing, not HTTP: not reporting
                notes.append(f"{endpoint}: {error}")
                continue
            except ValueError as error:  # it answered, but not text (UnicodeDecodeError)
                raise LoadReadError(f"{endpoint}: {error}") from None
            try:
                values = parse_exposition(text, labels)
            except LoadReadError as error:
                raise LoadReadError(f"{endpoint}: {error}") from None
            if not values:
                notes.append(f"{endpoint}: no k2 token counters for {dict(labels)}")
                continue
            history = self._history.setdefault((serving_key, endpoint), deque())
            history.append(Scrape(now, values))
            _forget_before_window(history, now - window_seconds)
            sample_counts.append(len(history))
            for (name, label_items), increase in _increases(history).items():
                series_labels = dict(label_items)
                group, rank = series_labels.get(MetricLabels.GROUP, ""), series_labels.get(MetricLabels.RANK, "")
                ranks.add((group, rank))
                layer = series_labels.get(MetricLabels.LAYER, "")
                if name == Metrics.EXPERT_TOKENS.name:
                    expert_series.append((series_labels, increase))
                elif layer.isdigit():
                    key = (group, rank, int(layer))
                    slot_tokens[key] = slot_tokens.get(key, 0.0) + increase
        by_group, dropped = group_load_matrices(expert_series, num_layers=num_layers, num_experts=num_experts)
        load_LE = merge_groups(by_group, num_layers, num_experts)
        balancedness = measured_balancedness(slot_tokens)
        return LoadSample(
            load_LE=load_LE,
            ranks_seen=len(ranks),
            ranks_expected=ranks_expected,
            num_samples=min(sample_counts, default=0),
            window_seconds=window_seconds,
            source="scrape",
            measured_balancedness=balancedness,
            dropped_series=dropped,
            notes=tuple(notes),
            group_load_LE=by_group,
        )

    def read_twice(
        self,
        labels: Mapping[str, str],
        endpoints: Sequence[str],
        *,
        window_seconds: float,
        num_layers: int,
        num_experts: int,
        ranks_expected: int,
    ) -> LoadSample:
        """Scrape now, wait `window_seconds`, and read: for one-shot runs without earlier history."""

        def once() -> LoadSample:
            return self.read(
                labels,
                endpoints,
                window_seconds=window_seconds,
                num_layers=num_layers,
                num_experts=num_experts,
                ranks_expected=ranks_expected,
            )

        once()
        self._sleep(window_seconds)
        return once()


def _forget_before_window(history: deque[Scrape], window_start: float) -> None:
    """Drop scrapes older than the newest one taken at or before `window_start` (that one is the baseline)."""
    while len(history) > 1 and history[1].time <= window_start:
        history.popleft()


def _increases(history: deque[Scrape]) -> dict[SeriesKey, float]:
    """Counter increase of every series present in the newest scrape, over the history (resets handled)."""
    newest = history[-1].values
    increases: dict[SeriesKey, float] = {}
    for key in newest:
        values = [scrape.values[key] for scrape in history if key in scrape.values]
        # A series missing from the baseline started inside the window: it counts from zero.
        if key not in history[0].values:
            values = [0.0, *values]
        increases[key] = counter_increase(values)
    return increases
