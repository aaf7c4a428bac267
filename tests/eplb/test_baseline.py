"""The published greedy EPLB (global policy), re-implemented as the comparison baseline."""

from __future__ import annotations

import numpy as np
import pytest

from k2_eplb.baseline import greedy_rebalance
from k2_eplb.metrics import balancedness, gpu_loads, replica_counts

EXAMPLE = np.array([[600, 560, 120, 120, 20, 10, 10, 10]], dtype=float)


def test_reproduces_published_max_load_on_the_8_gpu_example() -> None:
    placement = greedy_rebalance(EXAMPLE, num_gpus=8, slots_per_gpu=2)
    assert gpu_loads(EXAMPLE, placement).max() == pytest.approx(232.0)


def test_replicates_by_highest_load_per_replica() -> None:
    placement = greedy_rebalance(EXAMPLE, num_gpus=8, slots_per_gpu=2)
    # 8 extra slots: 600 and 560 alternate until 600/5 = 120 < 560/4 = 140 gives the last slot to expert 1
    assert replica_counts(placement, 8)[0].tolist() == [5, 5, 1, 1, 1, 1, 1, 1]


def test_packs_heaviest_first_onto_the_lightest_gpu_and_may_duplicate() -> None:
    placement = greedy_rebalance(EXAMPLE, num_gpus=8, slots_per_gpu=2)
    # the eighth-heaviest replica (expert 1, 112) lands alone, then the ninth (expert 1 again) joins it
    assert sorted(map(sorted, placement[0].tolist())) == [
        [0, 1],
        [0, 1],
        [0, 1],
        [0, 4],
        [0, 5],
        [1, 1],
        [2, 6],
        [3, 7],
    ]


def test_no_redundant_slots_is_a_permutation() -> None:
    load = np.array([[5.0, 1.0, 3.0, 2.0]])
    placement = greedy_rebalance(load, num_gpus=2, slots_per_gpu=2)
    assert sorted(placement.ravel().tolist()) == [0, 1, 2, 3]
    # heaviest first onto the lightest GPU: 5 | 3, then 2 -> GPU 1, then 1 -> GPU 0
    assert gpu_loads(load, placement).tolist() == [[6.0, 5.0]]


def test_matches_reference_balancedness_on_lognormal_k2_shape() -> None:
    # the notes measured 0.984 (128 GPUs x 4) with the reference eplb.py on this kind of load
    load = np.random.default_rng(0).lognormal(0.0, 1.0, size=(60, 384))
    assert balancedness(load, greedy_rebalance(load, 128, 4)).mean() == pytest.approx(0.984, abs=0.005)


@pytest.mark.parametrize(
    ("load", "gpus", "slots", "name"),
    [
        (np.ones(4), 2, 2, "load"),
        (np.array([[1.0, np.nan]]), 2, 1, "load"),
        (np.array([[1.0, -1.0]]), 2, 1, "load"),
        (np.ones((1, 5)), 2, 2, "num_gpus, slots_per_gpu"),
        (np.ones((1, 4)), 0, 2, "num_gpus"),
    ],
)
def test_rejects_bad_input_naming_it(load: np.ndarray, gpus: int, slots: int, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        greedy_rebalance(load, gpus, slots)
