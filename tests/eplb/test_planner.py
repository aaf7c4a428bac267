"""The pure planner: every branch of the decision, and the invariants of a rebalance (hypothesis)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_api import round_robin
from k2_eplb import planner
from k2_eplb.load import LoadSample
from k2_eplb.metrics import count_moves, replica_counts
from k2_eplb.planner import IntArray, PlacementState, Policy, Reason, mean_balancedness
from k2_eplb.solver import solve
from k2_eplb.target import TargetResult, solve_to_target

NOW = 1_000_000.0
LAYERS, EXPERTS, GPUS, SLOTS = 2, 8, 4, 3
BYTES_PER_EXPERT = 6156  # any size: movedBytes is moves x bytes per expert (this is k2-debug's in fp8)
plan = functools.partial(planner.plan, bytes_per_expert=BYTES_PER_EXPERT)


def trivial_placement(layers: int = LAYERS, experts: int = EXPERTS, gpus: int = GPUS, slots: int = SLOTS) -> IntArray:
    tables = round_robin(layers, experts, gpus, slots)
    return np.array([t.slots for t in tables], dtype=np.int64)


def state(generation: int = 3, applied: int | None = 3, last: float | None = None) -> PlacementState:
    return PlacementState(
        trivial_placement(), generation=generation, applied_generation=applied, last_rebalance_time=last
    )


def sample(load: np.ndarray | None = None, ranks_seen: int = 4, num_samples: int = 10) -> LoadSample:
    if load is None:
        load = skewed()
    return LoadSample(
        load_LE=np.asarray(load, dtype=np.float64),
        ranks_seen=ranks_seen,
        ranks_expected=4,
        num_samples=num_samples,
        window_seconds=60,
        source="test",
    )


def skewed() -> np.ndarray:
    load = np.full((LAYERS, EXPERTS), 10.0)
    load[:, 0] = 400.0
    load[:, 5] = 150.0
    return load


POLICY = Policy(min_improvement=0.01, cooldown_seconds=120, window_seconds=60, max_moves=None)


def test_skewed_load_rebalances_with_the_next_generation() -> None:
    decision = plan(POLICY, state(), sample(), NOW)
    assert decision.reason is Reason.REBALANCED and decision.rebalance
    assert decision.generation == 4
    assert decision.placement_LGS is not None
    assert decision.staleness is not None and decision.predicted_balancedness is not None
    assert decision.staleness == pytest.approx(mean_balancedness(skewed(), trivial_placement()))
    assert decision.predicted_balancedness == pytest.approx(mean_balancedness(skewed(), decision.placement_LGS))
    assert decision.predicted_balancedness > decision.staleness + POLICY.min_improvement
    assert decision.moved_experts == count_moves(trivial_placement(), decision.placement_LGS) > 0
    assert decision.moved_bytes == decision.moved_experts * BYTES_PER_EXPERT
    assert "generation 4" in decision.message


def test_the_move_budget_bounds_the_copies() -> None:
    unbounded = plan(POLICY, state(), sample(), NOW)
    budget = max(1, unbounded.moved_experts // 2)
    bounded = plan(Policy(min_improvement=0.0, max_moves=budget), state(), sample(), NOW)
    assert bounded.rebalance
    assert bounded.moved_experts <= budget
    assert bounded.placement_LGS is not None
    assert count_moves(trivial_placement(), bounded.placement_LGS) <= budget


def test_a_zero_budget_changes_nothing() -> None:
    decision = plan(Policy(max_moves=0), state(), sample(), NOW)
    assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
    assert decision.placement_LGS is None and decision.moved_experts == 0


def test_balanced_load_stays_quiet() -> None:
    # Load proportional to the replica counts gives every slot, hence every GPU, the same tokens.
    balanced = replica_counts(trivial_placement(), EXPERTS).astype(np.float64)
    decision = plan(POLICY, state(), sample(balanced), NOW)
    assert decision.staleness == pytest.approx(1.0)
    assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
    assert decision.placement_LGS is None and decision.generation is None
    assert decision.message.startswith("predicted gain ")
    assert "< minImprovement 0.01" in decision.message


def test_gain_below_min_improvement_is_reported_with_numbers() -> None:
    strict = Policy(min_improvement=1.0)
    decision = plan(strict, state(), sample(), NOW)
    assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
    assert decision.predicted_balancedness is not None and decision.staleness is not None
    gain = decision.predicted_balancedness - decision.staleness
    assert decision.message.startswith(f"predicted gain {gain:.3f} < minImprovement 1")


def test_disabled() -> None:
    decision = plan(Policy(enabled=False), state(), sample(), NOW)
    assert (decision.reason, decision.message) == (Reason.DISABLED, "eplb disabled")
    assert decision.placement_LGS is None


@pytest.mark.parametrize("applied", [None, 0, 2])
def test_never_plans_while_the_previous_generation_applies(applied: int | None) -> None:
    decision = plan(POLICY, state(generation=3, applied=applied), sample(), NOW)
    assert decision.reason is Reason.APPLY_PENDING
    assert decision.message.startswith("previous generation 3 not yet applied")
    assert decision.placement_LGS is None
    assert decision.staleness is not None  # the load is still measured for the metrics


def test_cooldown_counts_down_and_ends() -> None:
    during = plan(POLICY, state(last=NOW - 30), sample(), NOW)
    assert (during.reason, during.message) == (Reason.COOLDOWN, "cooldown: 90s left")
    after = plan(POLICY, state(last=NOW - 120), sample(), NOW)
    assert after.reason is Reason.REBALANCED


def test_partial_metrics() -> None:
    decision = plan(POLICY, state(), sample(ranks_seen=3), NOW)
    assert (decision.reason, decision.message) == (Reason.PARTIAL_METRICS, "partial metrics: 3/4 ranks reporting")
    assert decision.staleness is None


def test_too_few_samples() -> None:
    decision = plan(POLICY, state(), sample(num_samples=1), NOW)
    assert decision.reason is Reason.TOO_FEW_SAMPLES
    assert decision.message == "too few samples: 1 < 2 in the 60s window"


def test_no_load() -> None:
    decision = plan(POLICY, state(), sample(np.zeros((LAYERS, EXPERTS))), NOW)
    assert decision.reason is Reason.NO_LOAD


def test_unreadable_metrics() -> None:
    decision = plan(POLICY, state(), None, NOW, load_error="prometheus http://127.0.0.1:1: refused")
    assert decision.reason is Reason.METRICS_UNAVAILABLE
    assert "refused" in decision.message


def test_load_of_another_shape_is_refused() -> None:
    decision = plan(POLICY, state(), sample(np.ones((LAYERS + 1, EXPERTS))), NOW)
    assert decision.reason is Reason.METRICS_UNAVAILABLE


def test_a_placement_the_solver_rejects_is_reported() -> None:
    duplicated = trivial_placement()
    duplicated[0, 0, 1] = duplicated[0, 0, 0]  # two replicas of one expert on GPU 0 (and one expert lost)
    bad = PlacementState(duplicated, generation=1, applied_generation=1)
    decision = plan(POLICY, bad, sample(), NOW)
    assert decision.reason is Reason.INVALID_PLACEMENT
    assert "current" in decision.message


def test_gates_in_order_disabled_pending_cooldown_data() -> None:
    everything_wrong = state(generation=3, applied=2, last=NOW - 1)
    assert plan(Policy(enabled=False), everything_wrong, None, NOW).reason is Reason.DISABLED
    assert plan(POLICY, everything_wrong, None, NOW).reason is Reason.APPLY_PENDING
    assert plan(POLICY, state(last=NOW - 1), None, NOW).reason is Reason.COOLDOWN
    assert plan(POLICY, state(), None, NOW).reason is Reason.METRICS_UNAVAILABLE


@pytest.mark.parametrize(
    ("field", "value"),
    [("window_seconds", 0), ("min_improvement", -0.1), ("max_moves", -1), ("cooldown_seconds", -1), ("min_samples", 1)],
)
def test_policy_rejects_bad_knobs(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        Policy(**{field: value})  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    layers=st.integers(1, 3),
    experts=st.integers(2, 12),
    gpus=st.integers(2, 5),
    extra=st.integers(0, 2),
    budget=st.one_of(st.none(), st.integers(0, 12)),
    min_improvement=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_a_rebalance_is_valid_within_budget_and_worth_it(
    layers: int, experts: int, gpus: int, extra: int, budget: int | None, min_improvement: float, seed: int
) -> None:
    slots = -(-experts // gpus) + extra
    if slots > experts:
        slots = experts
    current = trivial_placement(layers, experts, gpus, slots)
    load = np.random.default_rng(seed).lognormal(0.0, 1.5, size=(layers, experts))
    policy = Policy(min_improvement=min_improvement, max_moves=budget)
    the_state = PlacementState(current, generation=1, applied_generation=1)
    load_sample = LoadSample(load, ranks_seen=2, ranks_expected=2, num_samples=5, window_seconds=60, source="test")
    decision = plan(policy, the_state, load_sample, NOW)
    assert decision.staleness == pytest.approx(mean_balancedness(load, current))
    if not decision.rebalance:
        assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
        assert decision.placement_LGS is None
        return
    new = decision.placement_LGS
    assert new is not None and new.shape == current.shape
    assert (replica_counts(new, experts) >= 1).all()
    ordered = np.sort(new, axis=2)
    assert not (ordered[:, :, 1:] == ordered[:, :, :-1]).any()
    assert budget is None or decision.moved_experts <= budget
    assert decision.moved_experts == count_moves(current, new) > 0
    assert decision.predicted_balancedness is not None and decision.staleness is not None
    assert decision.predicted_balancedness - decision.staleness >= min_improvement
    assert decision.generation == 2


def test_a_rebalance_beyond_the_budget_writes_round_one_of_a_plan() -> None:
    decision = plan(Policy(min_improvement=0.01, max_moves=1, cooldown_seconds=120), state(), sample(), NOW)
    assert decision.reason is Reason.REBALANCED and decision.moved_experts == 1
    progress = decision.plan
    assert progress is not None and progress.round == 1 and progress.rounds >= 2
    assert (progress.generation, progress.moves_per_round) == (4, 1)
    assert decision.predicted_balancedness is not None
    assert progress.predicted_balancedness > decision.predicted_balancedness
    assert decision.message.startswith(f"generation 4: round 1 of {progress.rounds}, predicted balancedness")


def test_the_next_round_of_a_plan_waits_a_scaled_cooldown_and_numbers_on() -> None:
    policy = Policy(min_improvement=0.01, max_moves=1, cooldown_seconds=120)
    first = plan(policy, state(), sample(), NOW)
    assert first.plan is not None and first.placement_LGS is not None
    rounds = first.plan.rounds
    # The workers applied round 1 (generation 4); between rounds the cooldown is 120 s / rounds.
    after = PlacementState(first.placement_LGS, 4, 4, last_rebalance_time=NOW, plan=first.plan)
    waiting = plan(policy, after, sample(), NOW + 120 / rounds - 1)
    assert (waiting.reason, waiting.message) == (Reason.COOLDOWN, f"cooldown: 1s left before round 2 of {rounds}")
    assert waiting.plan == first.plan  # shown as it is
    second = plan(policy, after, sample(), NOW + 120 / rounds)
    assert second.reason is Reason.REBALANCED and second.plan is not None
    assert (second.plan.round, second.plan.rounds, second.plan.generation) == (2, rounds, 5)
    assert second.message.startswith(f"generation 5: round 2 of {rounds},")


def test_a_plan_in_progress_whose_next_round_gains_too_little_ends_at_the_round_written() -> None:
    policy = Policy(min_improvement=0.01, max_moves=1, cooldown_seconds=120)
    first = plan(policy, state(), sample(), NOW)
    assert first.plan is not None and first.placement_LGS is not None
    after = PlacementState(first.placement_LGS, 4, 4, last_rebalance_time=NOW - 1000, plan=first.plan)
    # The load moved to what round 1 balances already: no further round is worth it.
    balanced = replica_counts(first.placement_LGS, EXPERTS).astype(np.float64)
    decision = plan(policy, after, sample(balanced), NOW)
    assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
    assert decision.plan is not None and (decision.plan.round, decision.plan.rounds) == (1, 1)


def test_the_apply_gate_names_the_ranks_behind() -> None:
    behind = PlacementState(trivial_placement(), 3, 3, ranks_behind=("k2-g1-0",))
    decision = plan(POLICY, behind, sample(), NOW)
    assert decision.reason is Reason.APPLY_PENDING
    assert decision.message == "previous generation 3 not yet applied (applied: 3); ranks behind: k2-g1-0"


def test_per_group_load_is_planned_on_its_sum_and_each_group_is_reported() -> None:
    """The merge rule: one placement serves every group, so it is planned on the sum over groups."""
    first, second = np.full((LAYERS, EXPERTS), 10.0), np.full((LAYERS, EXPERTS), 10.0)
    first[:, 0], second[:, 5] = 400.0, 300.0
    merged = LoadSample(first + second, 8, 8, 10, 60, "test", group_load_LE={"0": first, "1": second})
    decision = plan(POLICY, state(), merged, NOW)
    on_sum = plan(POLICY, state(), sample(first + second), NOW)
    assert decision.reason is Reason.REBALANCED and decision.placement_LGS is not None
    assert on_sum.placement_LGS is not None
    np.testing.assert_array_equal(decision.placement_LGS, on_sum.placement_LGS)
    groups = decision.group_balancedness
    assert groups is not None and set(groups) == {"0", "1"}
    for group, load in (("0", first), ("1", second)):
        assert groups[group] == pytest.approx(mean_balancedness(load, decision.placement_LGS))
    worst = min(groups, key=groups.__getitem__)
    assert f", worst group {worst} at {groups[worst]:.3f}" in decision.message


def test_gpus_per_node_reaches_both_solvers() -> None:
    seen: list[int | None] = []

    def spy_solve(*args: object, **kwargs: object) -> IntArray:
        seen.append(kwargs["gpus_per_node"])  # type: ignore[arg-type]
        return solve(*args, **kwargs)  # type: ignore[arg-type]

    def spy_target(*args: object, **kwargs: object) -> TargetResult:
        seen.append(kwargs["gpus_per_node"])  # type: ignore[arg-type]
        return solve_to_target(*args, **kwargs)  # type: ignore[arg-type]

    policy = Policy(min_improvement=0.01, max_moves=1)
    decision = plan(policy, state(), sample(), NOW, gpus_per_node=2, solver=spy_solve, target_solver=spy_target)
    assert decision.rebalance
    assert len(seen) >= 2 and set(seen) == {2}
