"""Hypothesis properties of the solver on random shapes and loads."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_eplb.metrics import balancedness, count_moves, moves_per_layer
from k2_eplb.solver import solve
from tests.eplb.helpers import assert_valid_placement

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """(load [layers, experts], num_gpus, slots_per_gpu) with every expert placeable and distinct per GPU."""
    num_experts = draw(st.integers(1, 12))
    num_gpus = draw(st.integers(1, 8))
    slots = draw(st.integers(-(-num_experts // num_gpus), num_experts).filter(lambda s: s <= 6))
    num_layers = draw(st.integers(1, 3))
    values = st.one_of(
        st.floats(0.0, 1e4, allow_nan=False, allow_infinity=False),
        st.integers(0, 50).map(float),
    )
    load = draw(st.lists(values, min_size=num_layers * num_experts, max_size=num_layers * num_experts))
    return np.array(load).reshape(num_layers, num_experts), num_gpus, slots


@PROPERTY_SETTINGS
@given(problems())
def test_fresh_solution_satisfies_every_invariant(problem: tuple[np.ndarray, int, int]) -> None:
    load, gpus, slots = problem
    placement = solve(load, gpus, slots)
    assert_valid_placement(placement, load.shape[0], load.shape[1], (gpus, slots))
    assert ((balancedness(load, placement) > 0) & (balancedness(load, placement) <= 1 + 1e-12)).all()


@PROPERTY_SETTINGS
@given(problems(), st.integers(0, 10**6), st.integers(0, 30))
def test_incremental_solution_is_valid_and_within_budget(
    problem: tuple[np.ndarray, int, int], seed: int, max_moves: int
) -> None:
    load, gpus, slots = problem
    current = solve(load, gpus, slots)
    drifted = load * np.random.default_rng(seed).lognormal(0.0, 0.5, size=load.shape)
    placement = solve(drifted, gpus, slots, current=current, max_moves=max_moves)
    assert_valid_placement(placement, load.shape[0], load.shape[1], (gpus, slots))
    assert count_moves(current, placement) <= max_moves
    # the search only accepts changes that do not raise a layer's max load
    assert (balancedness(drifted, placement) >= balancedness(drifted, current) - 1e-9).all()


@PROPERTY_SETTINGS
@given(problems(), st.integers(0, 10**6), st.sampled_from([None, 1, 2]))
def test_zero_budget_returns_current_unchanged(
    problem: tuple[np.ndarray, int, int], seed: int, gpus_per_node_choice: int | None
) -> None:
    load, gpus, slots = problem
    current = solve(load, gpus, slots)
    drifted = load * np.random.default_rng(seed).lognormal(0.0, 0.5, size=load.shape)
    per_node = gpus_per_node_choice if gpus_per_node_choice is not None and gpus % gpus_per_node_choice == 0 else None
    placement = solve(drifted, gpus, slots, current=current, max_moves=0, gpus_per_node=per_node)
    np.testing.assert_array_equal(placement, current)
    assert moves_per_layer(current, placement).sum() == 0


@PROPERTY_SETTINGS
@given(st.integers(1, 10), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.floats(0.5, 1e4))
def test_uniform_load_is_perfectly_balanced_when_it_divides(
    num_experts: int, replicas: int, num_layers: int, slots: int, tokens: float
) -> None:
    # num_experts * replicas slots, spread over num_gpus GPUs of `slots` each: every replica carries tokens / replicas
    total = num_experts * replicas
    if total % slots or slots > num_experts or replicas > total // slots:
        return
    gpus = total // slots
    load = np.full((num_layers, num_experts), tokens)
    placement = solve(load, gpus, slots)
    assert_valid_placement(placement, num_layers, num_experts, (gpus, slots))
    np.testing.assert_allclose(balancedness(load, placement), 1.0, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(problems(), st.integers(0, 10**6), st.one_of(st.none(), st.integers(0, 20)))
def test_deterministic(problem: tuple[np.ndarray, int, int], seed: int, max_moves: int | None) -> None:
    load, gpus, slots = problem
    np.testing.assert_array_equal(solve(load, gpus, slots), solve(load, gpus, slots))
    current = solve(load, gpus, slots)
    drifted = load * np.random.default_rng(seed).lognormal(0.0, 0.5, size=load.shape)
    first = solve(drifted, gpus, slots, current=current, max_moves=max_moves)
    second = solve(drifted, gpus, slots, current=current.copy(), max_moves=max_moves)
    np.testing.assert_array_equal(first, second)
