"""Rebalancing in rounds, the pure part: the plan of budgeted placements, its progress numbering and its cooldown."""

from __future__ import annotations

import numpy as np
import pytest

from k2_api import round_robin
from k2_api.placement import RebalancePlan
from k2_eplb.metrics import count_moves
from k2_eplb.rounds import (
    Progress,
    cooldown_seconds,
    mean_balancedness,
    next_round,
    plan_rounds,
    progress_after_stop,
    progress_after_write,
)
from k2_eplb.solver import solve
from k2_eplb.target import solve_to_target
from tests.eplb.helpers import assert_valid_placement

LAYERS, EXPERTS, GPUS, SLOTS = 2, 8, 4, 3


def initial() -> np.ndarray:
    return np.array([t.slots for t in round_robin(LAYERS, EXPERTS, GPUS, SLOTS)], dtype=np.int64)


def hot(expert: int = 2, weight: float = 3000.0) -> np.ndarray:
    load = np.full((LAYERS, EXPERTS), 100.0)
    load[:, expert] = weight
    return load


def test_a_budget_too_small_for_the_target_gives_several_rounds_each_within_it_and_each_better() -> None:
    load, start = hot(), initial()
    plan = plan_rounds(load, start, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    assert len(plan.rounds) >= 3
    previous, balance = start, mean_balancedness(load, start)
    assert plan.start_balancedness == pytest.approx(balance)
    for step in plan.rounds:
        assert_valid_placement(step.placement_LGS, LAYERS, EXPERTS, (GPUS, SLOTS))
        assert step.moves == count_moves(previous, step.placement_LGS) <= 1
        assert step.balancedness == pytest.approx(mean_balancedness(load, step.placement_LGS))
        assert step.balancedness >= balance + 0.01
        previous, balance = step.placement_LGS, step.balancedness
    assert plan.reaches_target and plan.final_balancedness >= plan.target_balancedness
    fresh = solve_to_target(load, GPUS, SLOTS, current=start, epsilon=0.01)
    assert plan.target_balancedness == pytest.approx(fresh.fresh_balance - 0.01)
    # Only the last round reaches the target: the plan stops there.
    assert all(step.balancedness < plan.target_balancedness for step in plan.rounds[:-1])
    # The first round is the budgeted solve from the current placement.
    np.testing.assert_array_equal(plan.rounds[0].placement_LGS, solve(load, GPUS, SLOTS, current=start, max_moves=1))


def test_a_budget_that_reaches_the_target_gives_one_round_with_the_target_modes_placement() -> None:
    load, start = hot(), initial()
    aim = solve_to_target(load, GPUS, SLOTS, current=start, epsilon=0.01)
    plan = plan_rounds(load, start, budget=aim.moves, epsilon=0.01, min_gain=0.01, max_rounds=8)
    (only,) = plan.rounds
    np.testing.assert_array_equal(only.placement_LGS, aim.placement)
    assert only.moves == aim.moves and plan.reaches_target
    unbounded = plan_rounds(load, start, budget=None, epsilon=0.01, min_gain=0.01, max_rounds=8)
    np.testing.assert_array_equal(unbounded.rounds[0].placement_LGS, aim.placement)


def test_the_next_round_replanned_from_the_first_one_on_the_same_load_is_the_plans_second() -> None:
    """What makes the plan survive a restart: each round re-plans from the placement in force, and on the same load
    that reproduces the rest of the plan."""
    load = hot()
    plan = plan_rounds(load, initial(), budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    rest = plan_rounds(load, plan.rounds[0].placement_LGS, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    assert len(rest.rounds) == len(plan.rounds) - 1
    for planned, replanned in zip(plan.rounds[1:], rest.rounds, strict=True):
        np.testing.assert_array_equal(planned.placement_LGS, replanned.placement_LGS)


def test_a_load_shift_replans_from_the_placement_in_force() -> None:
    plan = plan_rounds(hot(2), initial(), budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    midway = plan.rounds[0].placement_LGS
    shifted = plan_rounds(hot(6), midway, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    assert shifted.start_balancedness == pytest.approx(mean_balancedness(hot(6), midway))
    assert shifted.rounds and count_moves(midway, shifted.rounds[0].placement_LGS) == 1
    assert shifted.final_balancedness > shifted.start_balancedness
    assert not np.array_equal(shifted.rounds[0].placement_LGS, plan.rounds[1].placement_LGS)


def test_max_rounds_bounds_the_plan_and_a_small_gain_ends_it() -> None:
    load, start = hot(), initial()
    capped = plan_rounds(load, start, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=2)
    assert len(capped.rounds) == 2 and not capped.reaches_target and capped.rejected is None
    strict = plan_rounds(load, start, budget=1, epsilon=0.01, min_gain=0.5, max_rounds=8)
    assert strict.rounds == () and strict.rejected is not None
    assert strict.rejected.moves == 1 and strict.rejected.balancedness < strict.start_balancedness + 0.5
    assert strict.final_balancedness == strict.start_balancedness


def test_balanced_load_plans_nothing() -> None:
    start = initial()
    counts = np.stack([np.bincount(layer.ravel(), minlength=EXPERTS) for layer in start]).astype(np.float64)
    plan = plan_rounds(counts, start, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    assert plan.rounds == () and plan.start_balancedness == pytest.approx(1.0)


def progress(round_: int = 1, rounds: int = 3, generation: int = 5) -> Progress:
    return Progress(round_, rounds, generation, 0.95, 0.96, 2)


def test_progress_numbers_on_while_the_plan_continues_and_restarts_otherwise() -> None:
    plan = plan_rounds(hot(), initial(), budget=1, epsilon=0.01, min_gain=0.01, max_rounds=8)
    n = len(plan.rounds)
    first = progress_after_write(None, plan, 6, 1)
    assert (first.round, first.rounds, first.generation, first.moves_per_round) == (1, n, 6, 1)
    assert first.predicted_balancedness == pytest.approx(plan.final_balancedness)
    assert first.target_balancedness == pytest.approx(plan.target_balancedness)
    # Round 2 of 3 was written as generation 5; the replanned remainder of two rounds makes it 3 of 4.
    two = plan_rounds(hot(), plan.rounds[-3].placement_LGS, budget=1, epsilon=0.01, min_gain=0.01, max_rounds=2)
    assert len(two.rounds) == 2
    following = progress_after_write(progress(2, 3, 5), two, 6, 1)
    assert (following.round, following.rounds) == (3, 4)
    # Someone else wrote spec (generation 5 is not the plan's 4), or the plan was done: a new plan starts at 1.
    assert progress_after_write(progress(2, 3, 4), two, 6, 1).round == 1
    assert progress_after_write(progress(3, 3, 5), two, 6, 1).round == 1


def test_a_stop_ends_the_plan_at_the_round_written() -> None:
    assert progress_after_stop(progress(2, 4, 5), 5) == progress(2, 2, 5)
    assert progress_after_stop(progress(2, 4, 5), 6) == progress(2, 4, 5)  # not the plan's generation: left alone
    assert progress_after_stop(None, 5) is None


def test_cooldown_between_rounds_is_the_cooldown_over_the_rounds() -> None:
    assert cooldown_seconds(600.0, progress(1, 3, 5), 5) == pytest.approx(200.0)
    assert cooldown_seconds(600.0, progress(3, 3, 5), 5) == 600.0  # after the last round: the full cooldown
    assert cooldown_seconds(600.0, progress(1, 3, 4), 5) == 600.0
    assert cooldown_seconds(600.0, None, 5) == 600.0
    assert next_round(progress(1, 3, 5), 5) == "round 2 of 3"
    assert next_round(progress(3, 3, 5), 5) is None


def test_progress_round_trips_through_the_status_model() -> None:
    written = progress(2, 3, 5)
    model = RebalancePlan.model_validate(written.to_status())
    assert Progress.from_status(model) == written
    assert model.to_dict() == written.to_status()
    assert Progress.from_status(None) is None
    unbounded = Progress(1, 1, 2, 1.0000000002, -1e-12, None)
    assert unbounded.to_status() == {
        "round": 1,
        "rounds": 1,
        "generation": 2,
        "predictedBalancedness": 1.0,
        "targetBalancedness": 0.0,
    }
