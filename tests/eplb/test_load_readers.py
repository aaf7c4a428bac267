"""The load readers: counter arithmetic, direct scrapes (fake and real loopback endpoints) and a real Prometheus."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2_eplb.load import (
    LoadReadError,
    counter_increase,
    group_load_matrices,
    load_matrix,
    measured_balancedness,
    merge_groups,
)
from k2_eplb.prometheus_reader import PrometheusLoadReader, selector
from k2_eplb.scrape_reader import ScrapeLoadReader, parse_exposition
from tests.eplb.load_exporter import FakeServing, skewed_load
from tests.eplb.prometheus_server import Prometheus, running_prometheus
from tests.support.ports import free_port

LABELS = {"serving": "k2"}


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=1000), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    st.integers(min_value=0, max_value=10_000),
)
def test_counter_increase_counts_every_token_across_observable_resets(
    steps: list[tuple[int, bool]], start: int
) -> None:
    values = [float(start)]
    for increment, reset in steps:
        previous = values[-1]
        # A reset is observable when the restarted counter is below the old value (Prometheus has the same limit).
        values.append(float(increment) if reset and increment < previous else previous + increment)
    assert counter_increase(values) == sum(increment for increment, _ in steps)


def test_counter_increase_of_one_sample_is_zero() -> None:
    assert counter_increase([5.0]) == 0.0
    assert counter_increase([]) == 0.0


def test_load_matrix_sums_groups_and_drops_series_out_of_range() -> None:
    series = [
        ({"layer": "0", "expert": "1"}, 3.0),
        ({"layer": "0", "expert": "1"}, 4.0),  # another group
        ({"layer": "1", "expert": "2"}, 5.0),
        ({"layer": "2", "expert": "0"}, 1.0),  # layer out of range (e.g. just after a reshape)
        ({"layer": "0", "expert": "3"}, 1.0),  # expert out of range
    ]
    load, dropped = load_matrix(series, num_layers=2, num_experts=3)
    np.testing.assert_array_equal(load, [[0.0, 7.0, 0.0], [0.0, 0.0, 5.0]])
    assert dropped == 2


@pytest.mark.parametrize(
    ("labels", "value", "problem"),
    [
        ({"layer": "x", "expert": "0"}, 1.0, "label layer='x'"),
        ({"expert": "0"}, 1.0, "label layer=None"),
        ({"layer": "0", "expert": "-1"}, 1.0, "label expert='-1'"),
        ({"layer": "0", "expert": "0"}, float("nan"), "value nan"),
        ({"layer": "0", "expert": "0"}, float("inf"), "value inf"),
        ({"layer": "0", "expert": "0"}, -2.0, "value -2.0"),
    ],
)
def test_load_matrix_refuses_a_malformed_series(labels: dict[str, str], value: float, problem: str) -> None:
    with pytest.raises(LoadReadError, match=re.escape(problem)):
        load_matrix([({"layer": "0", "expert": "1"}, 3.0), (labels, value)], num_layers=2, num_experts=3)


def test_load_matrix_refuses_an_overflowing_sum() -> None:
    with pytest.raises(LoadReadError, match="overflows"):
        load_matrix([({"layer": "0", "expert": "0"}, 1.7e308)] * 2, num_layers=1, num_experts=1)


def test_measured_balancedness_is_mean_over_group_and_layer_of_mean_over_max() -> None:
    tokens = {("0", "0", 0): 10.0, ("0", "1", 0): 30.0, ("0", "0", 1): 5.0, ("0", "1", 1): 5.0}
    assert measured_balancedness(tokens) == pytest.approx((20 / 30 + 1.0) / 2)
    assert measured_balancedness({}) is None


def test_selector_escapes_values() -> None:
    assert selector({"serving": 'a"b', "namespace": "n\\s"}) == '{serving="a\\"b",namespace="n\\\\s"}'


def exposition(rank: int, values: dict[tuple[int, int], float], serving: str = "k2", group: int = 0) -> str:
    lines = ["# TYPE k2_expert_tokens_total counter"]
    for (layer, expert), value in values.items():
        labels = f'serving="{serving}",group="{group}",rank="{rank}",layer="{layer}",expert="{expert}"'
        lines.append(f"k2_expert_tokens_total{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def test_parse_exposition_keeps_only_the_serving() -> None:
    text = exposition(0, {(0, 0): 1.0}) + exposition(0, {(0, 1): 2.0}, serving="other").split("\n", 1)[1]
    values = parse_exposition(text, LABELS)
    assert list(values.values()) == [1.0]


class FakeEndpoints:
    """Exposition text per URL that the test sets, and a clock the test moves."""

    def __init__(self) -> None:
        self.pages: dict[str, str | None] = {}
        self.now = 0.0

    def fetch(self, url: str, timeout: float) -> str:
        page = self.pages.get(url)
        if page is None:
            raise OSError(f"connection refused: {url}")
        return page


def reader_for(fake: FakeEndpoints) -> ScrapeLoadReader:
    return ScrapeLoadReader(fetch=fake.fetch, clock=lambda: fake.now, sleep=lambda s: None)


def test_scrape_reader_needs_two_scrapes_and_measures_the_increase() -> None:
    fake = FakeEndpoints()
    urls = ["a", "b"]
    fake.pages = {"a": exposition(0, {(0, 0): 100.0, (0, 1): 10.0}), "b": exposition(1, {(0, 0): 50.0, (0, 1): 0.0})}
    reader = reader_for(fake)
    first = reader.read(LABELS, urls, window_seconds=10, num_layers=1, num_experts=2, ranks_expected=2)
    assert first.num_samples == 1
    assert first.ranks_seen == 2
    fake.now = 10.0
    fake.pages = {"a": exposition(0, {(0, 0): 160.0, (0, 1): 20.0}), "b": exposition(1, {(0, 0): 80.0, (0, 1): 5.0})}
    second = reader.read(LABELS, urls, window_seconds=10, num_layers=1, num_experts=2, ranks_expected=2)
    assert second.num_samples == 2
    np.testing.assert_allclose(second.load_LE, [[60.0 + 30.0, 10.0 + 5.0]])


def test_scrape_reader_takes_a_reset_value_as_the_increase() -> None:
    fake = FakeEndpoints()
    fake.pages = {"a": exposition(0, {(0, 0): 1000.0, (0, 1): 500.0})}
    reader = reader_for(fake)
    reader.read(LABELS, ["a"], window_seconds=10, num_layers=1, num_experts=2, ranks_expected=1)
    fake.now = 5.0
    fake.pages = {"a": exposition(0, {(0, 0): 1100.0, (0, 1): 600.0})}
    reader.read(LABELS, ["a"], window_seconds=10, num_layers=1, num_experts=2, ranks_expected=1)
    fake.now = 10.0
    fake.pages = {"a": exposition(0, {(0, 0): 40.0, (0, 1): 30.0})}  # the worker restarted
    sample = reader.read(LABELS, ["a"], window_seconds=10, num_layers=1, num_experts=2, ranks_expected=1)
    np.testing.assert_allclose(sample.load_LE, [[100.0 + 40.0, 100.0 + 30.0]])
    assert sample.num_samples == 3


def test_scrape_reader_measures_from_the_newest_scrape_a_window_old() -> None:
    fake = FakeEndpoints()
    reader = reader_for(fake)
    for now, value in [(0.0, 0.0), (5.0, 50.0), (10.0, 100.0), (15.0, 150.0)]:
        fake.now = now
        fake.pages = {"a": exposition(0, {(0, 0): value, (0, 1): 0.0})}
        sample = reader.read(LABELS, ["a"], window_seconds=10, num_layers=1, num_experts=2, ranks_expected=1)
    # Baseline: the scrape at t=5 (the newest at least 10 s old), so 150 - 50.
    np.testing.assert_allclose(sample.load_LE, [[100.0, 0.0]])
    assert sample.num_samples == 3


def test_scrape_reader_counts_an_unreachable_rank_as_missing() -> None:
    fake = FakeEndpoints()
    fake.pages = {"a": exposition(0, {(0, 0): 1.0}), "b": None}
    sample = reader_for(fake).read(LABELS, ["a", "b"], window_seconds=10, num_layers=1, num_experts=2, ranks_expected=2)
    assert (sample.ranks_seen, sample.ranks_expected) == (1, 2)
    assert any("connection refused" in note for note in sample.notes)


def test_scrape_reader_on_real_loopback_endpoints() -> None:
    serving = FakeServing("k2", num_layers=2, num_experts=4, num_ranks=2, slots=3, tokens_per_s=1000.0)
    try:
        profile = skewed_load(2, 4, hot={0: 5.0})
        serving.set_profile(profile)
        serving.set_placement(np.array([[[0, 1, 2], [3, 0, 1]]] * 2))
        times = iter([0.0, 10.0])
        reader = ScrapeLoadReader(clock=lambda: next(times), sleep=lambda s: serving.advance(10.0))
        sample = reader.read_twice(
            LABELS, serving.urls, window_seconds=10, num_layers=2, num_experts=4, ranks_expected=2
        )
    finally:
        serving.stop()
    assert sample.num_samples == 2
    assert sample.ranks_seen == 2
    expected = profile / profile.sum(axis=1, keepdims=True) * 1000.0 * 10.0
    np.testing.assert_allclose(sample.load_LE, expected)
    # Slots: rank 0 holds a replica of 0 (hot, 2 replicas), 1 (2 replicas) and 2; rank 1 holds 3, 0 and 1.
    share = expected[0] / np.array([2, 2, 1, 1])
    rank0, rank1 = share[0] + share[1] + share[2], share[3] + share[0] + share[1]
    assert sample.measured_balancedness == pytest.approx((rank0 + rank1) / 2 / max(rank0, rank1))


# Real Prometheus ---------------------------------------------------------------------------------------------------

WINDOW = 8.0


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path / "prometheus") as server:
        yield server


@pytest.fixture
def fake_serving() -> Iterator[FakeServing]:
    serving = FakeServing("k2", num_layers=2, num_experts=8, num_ranks=3, slots=4, tokens_per_s=3000.0)
    serving.set_profile(skewed_load(2, 8, hot={3: 10.0, 5: 4.0}))
    serving.start()
    yield serving
    serving.stop()


def wait_for_full_window(server: Prometheus) -> None:
    promql = f"min(count_over_time(k2_expert_tokens_total[{WINDOW:g}s]))"
    server.wait_for(lambda: (server.scalar(promql) or 0) >= WINDOW, timeout=60, what="a full window of samples")


@pytest.mark.prometheus
def test_prometheus_reader_reads_the_skew(prometheus: Prometheus, fake_serving: FakeServing) -> None:
    prometheus.set_targets(fake_serving.targets, {"namespace": "ns1"})
    wait_for_full_window(prometheus)
    sample = PrometheusLoadReader(prometheus.url).read(
        {"serving": "k2", "namespace": "ns1"}, window_seconds=WINDOW, num_layers=2, num_experts=8, ranks_expected=3
    )
    assert sample.ranks_seen == 3
    assert sample.num_samples >= 2
    share = sample.load_LE / sample.load_LE.sum(axis=1, keepdims=True)
    expected = fake_serving.profile / fake_serving.profile.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(share, expected, rtol=0.1)
    # increase() over the window is about rate x window (extrapolated at the edges).
    assert sample.load_LE.sum(axis=1) == pytest.approx([3000.0 * WINDOW] * 2, rel=0.25)
    other = PrometheusLoadReader(prometheus.url).read(
        {"serving": "k2", "namespace": "other"}, window_seconds=WINDOW, num_layers=2, num_experts=8, ranks_expected=3
    )
    assert other.ranks_seen == 0 and other.total_tokens == 0


@pytest.mark.prometheus
def test_prometheus_reader_handles_a_counter_reset(prometheus: Prometheus, fake_serving: FakeServing) -> None:
    prometheus.set_targets(fake_serving.targets, {"namespace": "ns1"})
    wait_for_full_window(prometheus)
    for rank in fake_serving.ranks:  # every worker restarts: counters drop to zero and count up again
        rank.reset()
    time.sleep(WINDOW / 2)
    sample = PrometheusLoadReader(prometheus.url).read(
        {"serving": "k2", "namespace": "ns1"}, window_seconds=WINDOW, num_layers=2, num_experts=8, ranks_expected=3
    )
    # A reader doing last - first would see a large negative number here.
    assert sample.load_LE.min() > 0
    assert sample.load_LE.sum(axis=1) == pytest.approx([3000.0 * WINDOW] * 2, rel=0.25)
    assert int(np.argmax(sample.load_LE[0])) == 3


@pytest.mark.prometheus
def test_prometheus_reader_sees_a_rank_go_down(prometheus: Prometheus, fake_serving: FakeServing) -> None:
    prometheus.set_targets(fake_serving.targets, {"namespace": "ns1"})
    reader = PrometheusLoadReader(prometheus.url)
    labels = {"serving": "k2", "namespace": "ns1"}

    def ranks_seen() -> int:
        return reader.read(labels, window_seconds=WINDOW, num_layers=2, num_experts=8, ranks_expected=3).ranks_seen

    prometheus.wait_for(lambda: ranks_seen() == 3, what="3 ranks reporting")
    fake_serving.ranks[1].down()
    prometheus.wait_for(lambda: ranks_seen() == 2, what="the stopped rank going stale")


def test_prometheus_reader_reports_an_unreachable_server() -> None:
    reader = PrometheusLoadReader(f"http://127.0.0.1:{free_port()}", timeout=2)  # nothing listens there
    with pytest.raises(LoadReadError, match="prometheus"):
        reader.read(LABELS, window_seconds=10, num_layers=1, num_experts=2, ranks_expected=1)


def test_prometheus_reader_rejects_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="prometheusUrl"):
        PrometheusLoadReader("127.0.0.1:9090")


# Per-group load ----------------------------------------------------------------------------------------------------


def test_group_load_matrices_split_by_group_and_merge_by_sum() -> None:
    series = [
        ({"group": "0", "layer": "0", "expert": "1"}, 3.0),
        ({"group": "1", "layer": "0", "expert": "1"}, 4.0),
        ({"group": "1", "layer": "1", "expert": "0"}, 5.0),
        ({"group": "1", "layer": "2", "expert": "0"}, 9.0),  # out of range: dropped
    ]
    by_group, dropped = group_load_matrices(series, num_layers=2, num_experts=2)
    assert sorted(by_group) == ["0", "1"] and dropped == 1
    np.testing.assert_array_equal(by_group["0"], [[0.0, 3.0], [0.0, 0.0]])
    np.testing.assert_array_equal(by_group["1"], [[0.0, 4.0], [5.0, 0.0]])
    np.testing.assert_array_equal(merge_groups(by_group, 2, 2), [[0.0, 7.0], [5.0, 0.0]])
    with pytest.raises(LoadReadError, match="overflows"):
        merge_groups({"0": np.full((1, 1), 1.7e308), "1": np.full((1, 1), 1.7e308)}, 1, 1)


def test_scrape_reader_keeps_each_groups_load() -> None:
    fake = FakeEndpoints()
    urls = ["g0", "g1"]
    reader = reader_for(fake)
    for now, scale in [(0.0, 0.0), (10.0, 1.0)]:
        fake.now = now
        fake.pages = {
            "g0": exposition(0, {(0, 0): 100.0 * scale, (0, 1): 10.0 * scale}, group=0),
            "g1": exposition(0, {(0, 0): 5.0 * scale, (0, 1): 70.0 * scale}, group=1),
        }
        sample = reader.read(LABELS, urls, window_seconds=10, num_layers=1, num_experts=2, ranks_expected=2)
    assert sample.ranks_seen == 2  # (group, rank) pairs: rank 0 of each group
    np.testing.assert_allclose(sample.group_load_LE["0"], [[100.0, 10.0]])
    np.testing.assert_allclose(sample.group_load_LE["1"], [[5.0, 70.0]])
    np.testing.assert_allclose(sample.load_LE, [[105.0, 80.0]])


def test_prometheus_reader_asks_per_group_and_keeps_each_groups_load() -> None:
    asked: list[str] = []

    def fetch(url: str, timeout: float) -> bytes:
        promql = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["query"][0]
        asked.append(promql)
        rows: list[tuple[dict[str, str], float]] = []
        if promql.startswith("sum by (group, layer, expert)"):
            rows = [
                ({"group": "0", "layer": "0", "expert": "0"}, 30.0),
                ({"group": "1", "layer": "0", "expert": "0"}, 2.0),
                ({"group": "1", "layer": "0", "expert": "1"}, 40.0),
            ]
        elif promql.startswith("count by (group, rank)"):
            rows = [({"group": "0", "rank": "0"}, 2.0), ({"group": "1", "rank": "0"}, 2.0)]
        elif promql.startswith("min(count_over_time"):
            rows = [({}, 5.0)]
        result = [{"metric": labels, "value": [0, str(value)]} for labels, value in rows]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()

    sample = PrometheusLoadReader("http://127.0.0.1:9", fetch=fetch).read(
        LABELS, window_seconds=60, num_layers=1, num_experts=2, ranks_expected=2
    )
    assert asked[0] == 'sum by (group, layer, expert) (increase(k2_expert_tokens_total{serving="k2"}[60s]))'
    np.testing.assert_allclose(sample.group_load_LE["0"], [[30.0, 0.0]])
    np.testing.assert_allclose(sample.group_load_LE["1"], [[2.0, 40.0]])
    np.testing.assert_allclose(sample.load_LE, [[32.0, 40.0]])
    assert (sample.ranks_seen, sample.num_samples) == (2, 5)
