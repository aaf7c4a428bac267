"""The exact reference (`k2_eplb.exact`, a MILP through HiGHS) and the target mode measured against it."""

from __future__ import annotations

import highspy  # noqa: F401  the test extra installs it: a missing install fails here, never skips
import numpy as np
import pytest

from k2_eplb.bench import shocked_load, synthetic_load
from k2_eplb.exact import limit_for_goal, min_moves
from k2_eplb.metrics import balancedness, gpu_loads, moves_per_layer
from k2_eplb.solver import solve
from k2_eplb.target import solve_to_target
from tests.eplb.helpers import assert_valid_placement

EPSILON = 0.02
# measured with benchmarks/eplb_exact.py (see docs/benchmarks.md); a regression makes the heuristic costlier
MAX_EXTRA_MOVES = 0.25


def test_a_swap_is_the_only_way_and_costs_two() -> None:
    load = np.array([[10.0, 10.0, 1.0, 1.0]])
    current = np.array([[[0, 1], [2, 3]]])
    result = min_moves(load, current, np.array([11.0]))
    assert result.moves_L.tolist() == [2] and result.optimal_L.all()
    assert gpu_loads(load, result.placement).max() == 11.0
    # one replica each is forced (4 experts, 4 slots), so no limit below the mean is reachable
    assert min_moves(load, current, np.array([10.9])).moves_L.tolist() == [-1]


def test_a_hot_expert_takes_a_cold_ones_slot_for_one_copy() -> None:
    # expert 0 went hot; expert 3 has a spare replica on GPU 1: re-pointing it to 0 halves 0's share
    load = np.array([[12.0, 2.0, 2.0, 2.0]])
    current = np.array([[[0, 1], [2, 3], [3, 1]]])
    result = min_moves(load, current, np.array([8.0]))
    assert result.moves_L.tolist() == [1]
    assert moves_per_layer(current, result.placement).tolist() == [1]
    assert gpu_loads(load, result.placement).max() <= 8.0


@pytest.mark.parametrize("kind", ["lognormal", "zipf", "hotspot"])
def test_the_target_mode_stays_near_the_minimum(kind: str) -> None:
    """Shocked 8-GPU cases: the exact minimum is a valid placement at the goal, never above our copies, and ours
    stays within MAX_EXTRA_MOVES of it (summed over the seeds)."""
    ours_total = exact_total = 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        load = synthetic_load(kind, 2, 32, rng)
        current = solve(load, 8, 4)
        shocked = shocked_load(load, rng)
        ours = solve_to_target(shocked, 8, 4, current=current, epsilon=EPSILON)
        goal_L = ours.fresh_balancedness_L - EPSILON
        exact = min_moves(shocked, current, limit_for_goal(shocked, current, goal_L), time_limit_s=20.0)
        assert_valid_placement(exact.placement, 2, 32, (8, 4))
        assert exact.optimal_L.all()
        assert (balancedness(shocked, exact.placement) >= goal_L - 1e-6).all()
        np.testing.assert_array_equal(exact.moves_L, moves_per_layer(current, exact.placement))
        assert (exact.moves_L <= ours.moves_L).all()
        ours_total += ours.moves
        exact_total += int(exact.moves_L.sum())
    assert ours_total <= (1 + MAX_EXTRA_MOVES) * exact_total
