"""The target mode over the mean of the layers (`solve_to_target(over="mean")`) and its allocation of copies across
layers (`k2_eplb.allocate.allocate`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_eplb.allocate import allocate
from k2_eplb.metrics import balancedness, moves_per_layer
from k2_eplb.solver import solve
from k2_eplb.target import TargetResult, solve_to_target
from tests.eplb.helpers import assert_valid_placement
from tests.eplb.test_properties import problems
from tests.eplb.test_solver_target import Problem, shocked

MEAN_SETTINGS = settings(max_examples=30, deadline=None)


def check_mean_result(result: TargetResult, load: np.ndarray, current: np.ndarray, gpus: int, slots: int) -> None:
    """What a mean-mode result reports is what its placement does."""
    assert_valid_placement(result.placement, load.shape[0], load.shape[1], (gpus, slots))
    np.testing.assert_array_equal(result.moves_L, moves_per_layer(current, result.placement))
    np.testing.assert_allclose(result.balancedness_L, balancedness(load, result.placement), rtol=1e-12)
    assert result.over == "mean" and result.floor_epsilon is not None
    mean_ok = result.balance >= result.fresh_balance - result.epsilon - 1e-12
    floor_ok = (result.balancedness_L >= result.fresh_balancedness_L - result.floor_epsilon).all()
    assert result.reached == bool(mean_ok and floor_ok)


@MEAN_SETTINGS
@given(problems(), st.integers(0, 10**6), st.sampled_from([0.0, 0.01, 0.02, 0.05]))
def test_mean_target_is_reached_keeps_the_floor_and_never_costs_more_than_every_layer_at_epsilon(
    problem: Problem, seed: int, epsilon: float
) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    mean = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon, over="mean")
    per_layer = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon)
    check_mean_result(mean, load, current, gpus, slots)
    assert mean.reached and mean.floor_epsilon == 2 * epsilon
    assert mean.moves <= per_layer.moves
    assert (mean.moves_L <= mean.fresh_moves_L).all()


@MEAN_SETTINGS
@given(problems(), st.integers(0, 10**6), st.integers(0, 30), st.sampled_from([0.0, 0.02, 0.1]))
def test_mean_target_cap_is_never_exceeded_and_a_reachable_target_is_reached(
    problem: Problem, seed: int, cap: int, epsilon: float
) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    free = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon, over="mean")
    capped = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon, over="mean", max_moves=cap)
    check_mean_result(capped, load, current, gpus, slots)
    assert capped.moves <= cap
    if free.moves <= cap:
        assert capped.reached
        np.testing.assert_array_equal(capped.placement, free.placement)


def test_a_shock_costs_fewer_copies_over_the_mean_than_every_layer_at_epsilon() -> None:
    rng = np.random.default_rng(11)
    load = rng.lognormal(0.0, 1.0, size=(8, 96)) * 100
    current = solve(load, 32, 4)
    shifted = load * rng.lognormal(0.0, 0.3, size=load.shape)
    per_layer = solve_to_target(shifted, 32, 4, current=current, epsilon=0.02)
    mean = solve_to_target(shifted, 32, 4, current=current, epsilon=0.02, over="mean")
    tight_floor = solve_to_target(shifted, 32, 4, current=current, epsilon=0.02, over="mean", floor_epsilon=0.025)
    assert per_layer.reached and mean.reached and tight_floor.reached
    assert mean.moves < per_layer.moves
    assert mean.balance >= mean.fresh_balance - 0.02 - 1e-12
    assert (mean.balancedness_L >= mean.fresh_balancedness_L - 0.04).all()
    assert (tight_floor.balancedness_L >= tight_floor.fresh_balancedness_L - 0.025).all()
    assert tight_floor.moves <= per_layer.moves


def test_a_zero_deadline_over_the_mean_returns_a_valid_placement() -> None:
    rng = np.random.default_rng(5)
    load = rng.lognormal(0.0, 1.0, size=(3, 48)) * 100
    current = solve(load, 16, 4)
    shifted = load * rng.lognormal(0.0, 0.3, size=load.shape)
    result = solve_to_target(shifted, 16, 4, current=current, epsilon=0.02, over="mean", deadline_s=0.0)
    check_mean_result(result, shifted, current, 16, 4)
    assert result.moves == 0  # no rung ran: the current placement is all it had


@settings(max_examples=20, deadline=None)
@given(problems(), st.integers(0, 10**6), st.sampled_from([0.0, 0.02]), st.integers(2, 6))
def test_more_paths_never_cost_a_layer_more_copies(problem: Problem, seed: int, epsilon: float, paths: int) -> None:
    _, gpus, slots = problem
    current, load = shocked(problem, seed)
    one = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon)
    more = solve_to_target(load, gpus, slots, current=current, epsilon=epsilon, paths=paths)
    assert one.reached and more.reached
    assert (more.moves_L <= one.moves_L).all()
    assert_valid_placement(more.placement, load.shape[0], load.shape[1], (gpus, slots))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("over", {"over": "layers"}),
        ("floor_epsilon", {"floor_epsilon": 0.01}),
        ("paths", {"paths": 0}),
        ("paths", {"paths": 7}),
        ("paths", {"paths": True}),
    ],
)
def test_bad_mode_and_floor_are_refused_by_name(name: str, kwargs: dict[str, object]) -> None:
    load = np.ones((1, 4))
    current = solve(load, 2, 2)
    with pytest.raises(ValueError, match=name):
        solve_to_target(load, 2, 2, current=current, epsilon=0.02, **kwargs)  # type: ignore[arg-type]


# --- allocate -------------------------------------------------------------------------------------------------------


def test_copies_go_where_balance_is_cheapest() -> None:
    # layer 0 gains 0.10 for 2 copies, layer 1 gains 0.10 for 20: a need of +0.1 over the cheapest is met on layer 0
    moves = np.array([[0, 2, 4], [0, 20, 40]])
    balance = np.array([[0.8, 0.9, 0.95], [0.8, 0.9, 0.95]])
    pick = allocate(moves, balance, need=1.7, floor_L=np.zeros(2))
    assert pick.tolist() == [1, 0]
    pick = allocate(moves, balance, need=1.75, floor_L=np.zeros(2))
    assert pick.tolist() == [2, 0]


def test_the_floor_is_kept_and_a_short_need_takes_the_most_balanced() -> None:
    moves = np.array([[0, 2, 4], [0, 20, 40]])
    balance = np.array([[0.8, 0.9, 0.95], [0.8, 0.9, 0.95]])
    assert allocate(moves, balance, need=0.0, floor_L=np.array([0.0, 0.85])).tolist() == [0, 1]
    assert allocate(moves, balance, need=5.0, floor_L=np.zeros(2)).tolist() == [2, 2]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10**6), st.floats(0.0, 1.0))
def test_allocation_meets_need_and_floor_and_no_layer_can_step_back(
    num_layers: int, num_candidates: int, seed: int, need_at: float
) -> None:
    rng = np.random.default_rng(seed)
    moves = rng.integers(0, 10, size=(num_layers, num_candidates))
    balance = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], size=(num_layers, num_candidates))
    floor = balance.max(axis=1) - rng.choice([0.0, 0.1, 0.3, 1.0], size=num_layers)
    fits = np.where(balance >= floor[:, None], balance, -np.inf)
    lowest = np.where(np.isfinite(fits), balance, np.inf).min(axis=1).sum()
    need = lowest + need_at * (fits.max(axis=1).sum() - lowest)
    pick = allocate(moves, balance, need, floor)
    rows = np.arange(num_layers)
    chosen_moves, chosen = moves[rows, pick], balance[rows, pick]
    assert (chosen >= floor).all() and chosen.sum() >= need - 1e-12
    # No single cheaper swap keeps the need, compared as allocate compares (exactly, the same sum): with a tolerance,
    # a candidate a hair under the need would count as meeting it.
    for layer, k in itertools.product(range(num_layers), range(num_candidates)):
        if balance[layer, k] >= floor[layer] and moves[layer, k] < chosen_moves[layer]:
            assert chosen.sum() - chosen[layer] + balance[layer, k] < need
    # at most one candidate's copies above the exact optimum (the greedy's last step), found by brute force
    best = min(
        (
            int(moves[rows, choice].sum())
            for choice in itertools.product(range(num_candidates), repeat=num_layers)
            if (balance[rows, choice] >= floor).all() and balance[rows, choice].sum() >= need
        ),
        default=None,
    )
    assert best is not None and chosen_moves.sum() <= best + moves.max()
