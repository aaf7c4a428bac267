"""The balance-target mode (`k2_eplb.target.solve_to_target`) and GPU alignment (`k2_eplb.align.align_gpus`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_eplb.align import align_gpus
from k2_eplb.metrics import balancedness, count_moves, moves_per_layer
from k2_eplb.solver import solve
from k2_eplb.target import TargetResult, solve_to_target
from tests.eplb.helpers import assert_valid_placement
from tests.eplb.test_properties import problems

TARGET_SETTINGS = settings(max_examples=40, deadline=None)
Problem = tuple[np.ndarray, int, int]


def shocked(problem: Problem, seed: int, sigma: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(current placement solved on the load, the load after a lognormal(0, sigma) shock)."""
    load, gpus, slots = problem
    current = solve(load, gpus, slots)
    return current, load * np.random.default_rng(seed).lognormal(0.0, sigma, size=load.shape)


def check_result(result: TargetResult, load: np.ndarray, current: np.ndarray, gpus: int, slots: int) -> None:
    """What every result reports is what its placement does."""
    assert_valid_placement(result.placement, load.shape[0], load.shape[1], (gpus, slots))
    np.testing.assert_array_equal(result.moves_L, moves_per_layer(current, result.placement))
    np.testing.assert_allclose(result.balancedness_L, balancedness(load, result.placement), rtol=1e-12)
    np.testing.assert_allclose(result.fresh_balancedness_L, balancedness(load, solve(load, gpus, slots)), rtol=1e-12)
    assert result.moves == int(result.moves_L.sum())
    assert result.reached == bool((result.balancedness_L >= result.fresh_balancedness_L - result.epsilon).all())


@TARGET_SETTINGS
@given(problems(), st.integers(0, 10**6), st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3]))
def test_uncapped_target_is_reached_valid_and_never_costs_more_than_fresh(
    problem: Problem, seed: int, epsilon: float
) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    result = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon)
    check_result(result, load, current, gpus, slots)
    assert result.reached
    assert (result.balancedness_L >= result.fresh_balancedness_L - epsilon).all()
    assert (result.moves_L <= result.fresh_moves_L).all()
    # the fresh moves are those of our fresh solve, GPUs aligned to `current`: never more than unaligned
    assert result.fresh_moves_L.sum() <= count_moves(current, solve(load, gpus, slots))


@TARGET_SETTINGS
@given(problems(), st.integers(0, 10**6), st.integers(0, 30), st.sampled_from([0.0, 0.01, 0.1]))
def test_cap_is_never_exceeded_and_a_reachable_target_is_reached(
    problem: Problem, seed: int, cap: int, epsilon: float
) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    free = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon)
    capped = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon, max_moves=cap)
    check_result(capped, load, current, gpus, slots)
    assert capped.moves <= cap
    if free.moves <= cap:
        assert capped.reached
        np.testing.assert_array_equal(capped.placement, free.placement)
    else:  # the budgeted solve within the cap
        np.testing.assert_array_equal(capped.placement, solve(load, gpus, slots, current=current, max_moves=cap))


@TARGET_SETTINGS
@given(problems(), st.integers(0, 10**6))
def test_a_tight_and_a_loose_target_are_both_reached(problem: Problem, seed: int) -> None:
    """The repair's path depends on the load limit, so a looser target is not always cheaper layer by layer (the
    shock test below checks it is cheaper overall); each is reached and costs no more than the fresh solve."""
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    tight = solve_to_target(load, gpus, slots, current=current, epsilon=0.0)
    loose = solve_to_target(load, gpus, slots, current=current, epsilon=0.05)
    assert tight.balance >= tight.fresh_balance - 1e-12
    assert tight.reached and loose.reached
    assert (loose.moves_L <= loose.fresh_moves_L).all() and (tight.moves_L <= tight.fresh_moves_L).all()


@settings(max_examples=20, deadline=None)
@given(problems(), st.integers(0, 10**6), st.sampled_from([0.0, 0.02]))
def test_deterministic(problem: Problem, seed: int, epsilon: float) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    first = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon)
    second = solve_to_target(load, gpus, slots, current=current.copy(), epsilon=epsilon)
    np.testing.assert_array_equal(first.placement, second.placement)


def test_a_balanced_current_placement_moves_nothing() -> None:
    load = np.random.default_rng(3).lognormal(0.0, 1.0, size=(3, 24)) * 100
    current = solve(load, 8, 4)
    result = solve_to_target(load, 8, 4, current=current, epsilon=0.0)
    assert result.moves == 0 and result.reached
    np.testing.assert_array_equal(result.placement, current)


def test_a_shock_is_recovered_with_fewer_moves_than_a_fresh_solve() -> None:
    rng = np.random.default_rng(7)
    load = rng.lognormal(0.0, 1.0, size=(4, 96)) * 100
    current = solve(load, 32, 4)
    shifted = load * rng.lognormal(0.0, 0.3, size=load.shape)
    result = solve_to_target(shifted, 32, 4, current=current, epsilon=0.01)
    stale = balancedness(shifted, current).mean()
    assert result.reached and result.balance > stale + 0.05
    assert result.moves < result.fresh_moves_L.sum() < count_moves(current, solve(shifted, 32, 4))
    # each looser target costs fewer copies in total, and every layer reaches its goal
    results = [solve_to_target(shifted, 32, 4, current=current, epsilon=e) for e in (0.0, 0.005, 0.01, 0.02, 0.05)]
    for tighter, looser in itertools.pairwise(results):
        assert looser.moves < tighter.moves
        assert (looser.balancedness_L >= looser.fresh_balancedness_L - looser.epsilon).all()


@pytest.mark.parametrize("epsilon", [-0.01, float("nan"), float("inf"), True, "0.1"])
def test_bad_epsilon_is_refused_by_name(epsilon: object) -> None:
    load = np.ones((1, 4))
    current = solve(load, 2, 2)
    with pytest.raises(ValueError, match="epsilon"):
        solve_to_target(load, 2, 2, current=current, epsilon=epsilon)  # type: ignore[arg-type]


def test_bad_cap_and_current_are_refused_by_name() -> None:
    load = np.ones((1, 4))
    current = solve(load, 2, 2)
    with pytest.raises(ValueError, match="max_moves"):
        solve_to_target(load, 2, 2, current=current, epsilon=0.0, max_moves=-1)
    with pytest.raises(ValueError, match="current"):
        solve_to_target(load, 2, 2, current=current[:, :1], epsilon=0.0)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(0, 10**6))
def test_align_undoes_a_gpu_permutation_and_keeps_each_gpu_whole(problem: Problem, seed: int) -> None:
    load, gpus, slots = problem
    reference = solve(load, gpus, slots)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([layer[rng.permutation(gpus)] for layer in reference])
    aligned = align_gpus(reference, shuffled, load.shape[1])
    assert count_moves(reference, aligned) == 0
    # the same GPUs' contents, relabelled: the same balancedness
    for layer in range(load.shape[0]):
        gpus_of = [sorted(map(tuple, np.sort(p[layer], axis=1))) for p in (aligned, shuffled)]
        assert gpus_of[0] == gpus_of[1]
    np.testing.assert_allclose(balancedness(load, aligned), balancedness(load, shuffled), rtol=1e-12)


def test_node_topology_is_passed_through_and_checked() -> None:
    rng = np.random.default_rng(11)
    load = rng.lognormal(0.0, 1.0, size=(2, 64)) * 100
    current = solve(load, 16, 4)
    shifted = load * rng.lognormal(0.0, 0.3, size=load.shape)
    result = solve_to_target(shifted, 16, 4, current=current, epsilon=0.01, gpus_per_node=4)
    check_result(result, shifted, current, 16, 4)
    assert result.reached and 0 < result.moves <= result.fresh_moves_L.sum()
    capped = solve_to_target(shifted, 16, 4, current=current, epsilon=0.0, max_moves=3, gpus_per_node=4)
    expected = solve(shifted, 16, 4, current=current, max_moves=3, gpus_per_node=4)
    np.testing.assert_array_equal(capped.placement, expected)
    assert not capped.reached
    with pytest.raises(ValueError, match="gpus_per_node"):
        solve_to_target(shifted, 16, 4, current=current, epsilon=0.01, gpus_per_node=3)
