"""Threshold repair (`k2_eplb.repair.repair`) and the target mode's deadline (`solve_to_target(deadline_s=...)`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_eplb.local_search import Origin
from k2_eplb.metrics import balancedness, gpu_loads, moves_per_layer
from k2_eplb.repair import prune, repair
from k2_eplb.solver import solve
from k2_eplb.target import solve_to_target
from tests.eplb.helpers import assert_valid_placement
from tests.eplb.test_properties import problems
from tests.eplb.test_solver_target import Problem, shocked

REPAIR_SETTINGS = settings(max_examples=25, deadline=None)


def limits(load: np.ndarray, current: np.ndarray, goal: float) -> np.ndarray:
    """The max GPU load per layer at which balancedness is `goal`."""
    return gpu_loads(load, current).mean(axis=1) / goal * (1 + 1e-12)


@REPAIR_SETTINGS
@given(problems(), st.integers(0, 10**6), st.floats(0.5, 1.0), st.integers(0, 20))
def test_repair_is_valid_counts_its_copies_and_keeps_the_budget(
    problem: Problem, seed: int, goal: float, budget: int
) -> None:
    load, gpus, slots = problem
    current, shifted = shocked(problem, seed)
    num_layers, num_experts = load.shape
    limit = limits(shifted, current, goal)
    budget_L = np.full(num_layers, budget, dtype=np.int64)
    origin = Origin.of(current, num_experts, None)
    placed, spent, reached, cut = repair(shifted, current, limit_L=limit, origin=origin, layer_budget_L=budget_L)
    assert_valid_placement(placed, num_layers, num_experts, (gpus, slots))
    np.testing.assert_array_equal(spent, moves_per_layer(current, placed))
    assert (spent <= budget_L).all()
    np.testing.assert_array_equal(reached, gpu_loads(shifted, placed).max(axis=1) <= limit)
    assert not (reached & cut).any()
    # never less balanced than where it started
    assert (balancedness(shifted, placed) >= balancedness(shifted, current) - 1e-12).all()


@REPAIR_SETTINGS
@given(problems(), st.integers(0, 10**6), st.floats(0.7, 1.0), st.integers(0, 6))
def test_more_rounds_are_never_worse(problem: Problem, seed: int, goal: float, rounds: int) -> None:
    """A layer reached within fewer rounds is returned unchanged; any other is at least as balanced."""
    load, _, _ = problem
    current, shifted = shocked(problem, seed)
    limit = limits(shifted, current, goal)
    origin = Origin.of(current, load.shape[1], None)
    few, _, reached_few, _ = repair(shifted, current, limit_L=limit, origin=origin, max_rounds=rounds)
    more, _, reached_more, _ = repair(shifted, current, limit_L=limit, origin=origin, max_rounds=rounds + 3)
    assert (reached_more >= reached_few).all()
    np.testing.assert_array_equal(more[reached_few], few[reached_few])
    assert (balancedness(shifted, more) >= balancedness(shifted, few) - 1e-12).all()


def test_repair_reaches_a_shock_target_with_fewer_copies_than_a_fresh_solve() -> None:
    rng = np.random.default_rng(5)
    load = rng.lognormal(0.0, 1.0, size=(3, 96)) * 100
    current = solve(load, 32, 4)
    shifted = load * rng.lognormal(0.0, 0.3, size=load.shape)
    goal = 0.95
    placed, spent, reached, _ = repair(
        shifted, current, limit_L=limits(shifted, current, goal), origin=Origin.of(current, 96, None)
    )
    assert reached.all() and (balancedness(shifted, placed) >= goal).all()
    assert balancedness(shifted, current).max() < 0.9
    assert 0 < spent.sum() < moves_per_layer(current, solve(shifted, 32, 4)).sum() / 3


@REPAIR_SETTINGS
@given(problems(), st.integers(0, 10**6), st.floats(0.5, 1.0))
def test_prune_keeps_the_limit_and_the_placement_valid_and_only_gives_copies_back(
    problem: Problem, seed: int, goal: float
) -> None:
    load, gpus, slots = problem
    current, shifted = shocked(problem, seed)
    num_layers, num_experts = load.shape
    limit = limits(shifted, current, goal)
    placed, _, _, _ = repair(shifted, current, limit_L=limit, origin=Origin.of(current, num_experts, None))
    for start in (placed, solve(shifted, gpus, slots)):  # the repair's result, and a fresh solve that moved much
        pruned = prune(shifted, start, current, limit_L=limit)
        assert_valid_placement(pruned, num_layers, num_experts, (gpus, slots))
        assert (moves_per_layer(current, pruned) <= moves_per_layer(current, start)).all()
        within = gpu_loads(shifted, start).max(axis=1) <= limit
        assert (gpu_loads(shifted, pruned).max(axis=1)[within] <= limit[within]).all()
        # a layer it changed gave copies back and is within the limit
        changed = (pruned != start).any(axis=(1, 2))
        assert (moves_per_layer(current, pruned)[changed] < moves_per_layer(current, start)[changed]).all()
        assert (gpu_loads(shifted, pruned).max(axis=1)[changed] <= limit[changed]).all()
    np.testing.assert_array_equal(prune(shifted, current, current, limit_L=limit), current)


def test_prune_undoes_the_copies_the_limit_does_not_need() -> None:
    load = np.array([[4.0, 3.0, 2.0, 1.0]])
    current = np.array([[[0, 3], [1, 2]]])  # GPU loads 5 and 5
    detour = np.array([[[0, 2], [1, 3]]])  # 2 and 3 swapped: 6 and 4, two copies
    np.testing.assert_array_equal(prune(load, detour, current, limit_L=np.array([6.0])), current)
    np.testing.assert_array_equal(prune(load, detour, current, limit_L=np.array([4.9])), detour)  # 5 > 4.9
    # a third replica of expert 0 where expert 2 was (one copy): 2.33, 3.33, 2.33; back: 3, 3, 2
    load = np.array([[4.0, 2.0, 2.0]])
    current = np.array([[[0, 1], [0, 2], [1, 2]]])
    copied = np.array([[[0, 1], [0, 2], [1, 0]]])
    np.testing.assert_array_equal(prune(load, copied, current, limit_L=np.array([3.5])), current)
    np.testing.assert_array_equal(prune(load, copied, current, limit_L=np.array([2.9])), copied)


@settings(max_examples=20, deadline=None)
@given(problems(), st.integers(0, 10**6))
def test_a_zero_deadline_returns_a_valid_placement_and_no_deadline_reaches_the_target(
    problem: Problem, seed: int
) -> None:
    load, gpus, slots = problem
    current, shifted = shocked(problem, seed)
    now = solve_to_target(shifted, gpus, slots, current=current, epsilon=0.01, deadline_s=0.0)
    assert_valid_placement(now.placement, load.shape[0], load.shape[1], (gpus, slots))
    free = solve_to_target(shifted, gpus, slots, current=current, epsilon=0.01)
    late = solve_to_target(shifted, gpus, slots, current=current, epsilon=0.01, deadline_s=3600.0)
    assert free.reached
    np.testing.assert_array_equal(late.placement, free.placement)
    # a layer the zero deadline reached is reached as cheaply without one; any other is no better balanced
    goal_L = free.fresh_balancedness_L - 0.01
    hit = now.balancedness_L >= goal_L
    assert (free.moves_L[hit] <= now.moves_L[hit]).all()
    assert (np.minimum(free.balancedness_L, goal_L) >= np.minimum(now.balancedness_L, goal_L) - 1e-12).all()


@pytest.mark.parametrize("deadline", [-1.0, float("nan"), True, "1"])
def test_bad_deadline_is_refused_by_name(deadline: object) -> None:
    load = np.ones((1, 4))
    current = solve(load, 2, 2)
    with pytest.raises(ValueError, match="deadline_s"):
        solve_to_target(load, 2, 2, current=current, epsilon=0.0, deadline_s=deadline)  # type: ignore[arg-type]
