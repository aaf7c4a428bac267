"""benchmarks/serving_bound.py's accounting: which forwards each engine needs for a workload, and so its bound."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from tests.support.paths import ROOT


@pytest.fixture(scope="module")
def bound() -> ModuleType:
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving_bound

    return serving_bound


def test_a_freed_row_takes_the_next_request_where_a_static_batch_waits_for_its_longest(bound: ModuleType) -> None:
    from serving_engine import Request

    requests = [Request(0.0, [1], new) for new in (2, 10, 10)]
    flat = dict.fromkeys((1, 2), 1.0)  # every decoding forward costs 1 s, a prefill nothing
    result = bound.bounds(requests, 2, 512, flat, {1: 0.0, 512: 0.0})
    # continuous: one step of both rows, then the third request takes the freed row: 1 + 9 steps for 22 tokens;
    # static: the batch of the first two decodes 9 steps (its longest), then the third alone 9 more
    assert result == {"continuous": pytest.approx(22 / 10), "static": pytest.approx(22 / 18)}


def test_prefill_is_charged_per_chunk_and_decoding_by_the_rows_it_carries(bound: ModuleType) -> None:
    from serving_engine import Request

    requests = [Request(0.0, [1] * 5, 3), Request(0.0, [1] * 2, 3)]
    costs = {1: 1.0, 2: 1.5}
    prefill = {1: 0.25, 2: 0.5, 4: 2.0}  # a 5-token prompt in chunks of 4: one chunk of 4 and one of 1
    result = bound.bounds(requests, 2, 4, costs, prefill)
    fill = (2.0 + 0.25) + 0.5
    assert result == {"continuous": pytest.approx(6 / (fill + 2 * 1.5)), "static": pytest.approx(6 / (fill + 2 * 1.5))}
