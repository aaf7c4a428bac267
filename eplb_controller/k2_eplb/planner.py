"""The EPLB planner: a pure function from (policy, placement state, load, now) to a decision.

It decides, in this order: EPLB disabled; the previous generation still applying (on every rank); cooldown (shorter
between the rounds of a plan); load unusable (unreadable, partial, too few samples, no tokens); otherwise it plans
rounds from the current placement towards the fresh solve's balancedness (`k2_eplb.rounds`), each within the move
budget, and writes the first round when its predicted gain reaches the minimum improvement. No I/O: the controller
reads and writes.

Before all of that, `reshape`: a placement whose shape no longer fits its serving (the serving's ranks, slots or
model changed) gets a fresh solve on uniform load at once, past every gate, even with EPLB disabled, because the
ranks cannot run a placement of the wrong shape.

Shapes: L MoE layers, E logical experts, G ranks (GPUs) of one expert-parallel group, S slots per rank.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from k2_eplb import rounds
from k2_eplb.load import LoadSample
from k2_eplb.rounds import Progress, TargetFn
from k2_eplb.rounds import mean_balancedness as mean_balancedness  # re-exported: the planner's measure
from k2_eplb.solver import solve
from k2_eplb.target import solve_to_target

IntArray = npt.NDArray[np.int64]
SolveFn = Callable[..., IntArray]


class Reason(enum.StrEnum):
    """Why the planner decided what it did; also the condition reason and the `reason` label of the skip counter."""

    REBALANCED = "Rebalanced"
    DISABLED = "Disabled"
    APPLY_PENDING = "ApplyPending"
    COOLDOWN = "Cooldown"
    METRICS_UNAVAILABLE = "MetricsUnavailable"
    PARTIAL_METRICS = "PartialMetrics"
    TOO_FEW_SAMPLES = "TooFewSamples"
    NO_LOAD = "NoLoad"
    INVALID_PLACEMENT = "InvalidPlacement"
    BELOW_MIN_IMPROVEMENT = "BelowMinImprovement"
    RESHAPED = "Reshaped"


@dataclass(frozen=True)
class Policy:
    """The EPLB knobs of one serving (from K2Serving spec.eplb)."""

    enabled: bool = True
    window_seconds: float = 300.0
    min_improvement: float = 0.01
    max_moves: int | None = None
    cooldown_seconds: float = 600.0
    min_samples: int = 2
    target_epsilon: float = 0.01
    """A plan aims at the fresh solve's balancedness minus this."""
    max_rounds: int = 8
    """The most rounds one plan has."""

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError(f"windowSeconds: {self.window_seconds} must be > 0")
        if self.min_improvement < 0:
            raise ValueError(f"minImprovement: {self.min_improvement} must be >= 0")
        if self.max_moves is not None and self.max_moves < 0:
            raise ValueError(f"maxMoves: {self.max_moves} must be >= 0")
        if self.cooldown_seconds < 0:
            raise ValueError(f"cooldownSeconds: {self.cooldown_seconds} must be >= 0")
        if self.min_samples < 2:
            raise ValueError(f"min_samples: {self.min_samples} must be >= 2 (an increase needs two samples)")
        if not 0 <= self.target_epsilon < 1:
            raise ValueError(f"target_epsilon: {self.target_epsilon} must be in [0, 1)")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: {self.max_rounds} must be >= 1")


@dataclass(frozen=True)
class PlacementState:
    """The ExpertPlacement as observed: the placement in spec, its generation, what the workers applied, and the plan
    in rounds the controller is carrying out (status.rebalancePlan)."""

    placement_LGS: IntArray
    generation: int
    applied_generation: int | None
    last_rebalance_time: float | None = None
    plan: Progress | None = None
    ranks_behind: tuple[str, ...] = ()
    """Rank pods (status.ranks) that report an older generation than spec.generation, or none."""


@dataclass(frozen=True)
class Decision:
    """What to do. `placement_LGS` and `generation` are set only when `rebalance` is true.

    `staleness` is the balancedness of the current placement on the newest load (None when the load is unusable);
    `predicted_balancedness` that of the new placement (None when no solve ran). `plan` is the progress of the plan in
    rounds to show in status (None: none to show); `group_balancedness` the new placement's predicted balancedness on
    each group's own load.
    """

    reason: Reason
    message: str
    placement_LGS: IntArray | None = None
    generation: int | None = None
    staleness: float | None = None
    predicted_balancedness: float | None = None
    measured_balancedness: float | None = None
    moved_experts: int = 0
    moved_bytes: int = 0
    plan: Progress | None = None
    group_balancedness: dict[str, float] | None = None

    @property
    def rebalance(self) -> bool:
        return self.reason is Reason.REBALANCED

    @property
    def writes(self) -> bool:
        """A new generation to write: a rebalance or a reshape."""
        return self.reason in (Reason.REBALANCED, Reason.RESHAPED)


@dataclass(frozen=True)
class Shape:
    """What a placement's slot tables must fit: MoE layers, logical experts, ranks of one group, slots per rank."""

    num_layers: int
    num_experts: int
    ranks: int
    slots_per_rank: int

    @property
    def total_slots(self) -> int:
        """Slots of one group over all MoE layers: what `spec.eplb.maxMovesFraction` is a fraction of."""
        return self.num_layers * self.ranks * self.slots_per_rank

    def __str__(self) -> str:
        return (
            f"{self.num_layers} layers x {self.num_experts} experts on {self.ranks} ranks x {self.slots_per_rank} slots"
        )


def reshape(current: Shape, desired: Shape, generation: int, *, solver: SolveFn = solve) -> Decision | None:
    """A fresh placement (uniform load) as generation + 1 when `current` does not fit `desired`; None when it does."""
    if current == desired:
        return None
    uniform_LE = np.ones((desired.num_layers, desired.num_experts))
    new_LGS = np.asarray(solver(uniform_LE, desired.ranks, desired.slots_per_rank), dtype=np.int64)
    return Decision(
        Reason.RESHAPED,
        f"generation {generation + 1}: reshaped from {current} to {desired}",
        placement_LGS=new_LGS,
        generation=generation + 1,
    )


def plan(
    policy: Policy,
    state: PlacementState,
    sample: LoadSample | None,
    now: float,
    *,
    load_error: str | None = None,
    bytes_per_expert: int,
    gpus_per_node: int | None = None,
    solver: SolveFn = solve,
    target_solver: TargetFn = solve_to_target,
) -> Decision:
    """Decide whether to write a new placement generation; `sample` is None when the load could not be read.

    `gpus_per_node` (ranks per node, contiguous by rank) makes the solvers prefer copies from a replica on the same
    node."""
    if not policy.enabled:
        return Decision(Reason.DISABLED, "eplb disabled")
    data_problem = _data_problem(policy, state, sample, load_error)
    staleness = None
    if data_problem is None:
        assert sample is not None
        staleness = mean_balancedness(sample.load_LE, state.placement_LGS)
    measured = sample.measured_balancedness if sample is not None else None

    def skip(reason: Reason, message: str) -> Decision:
        return Decision(reason, message, staleness=staleness, measured_balancedness=measured, plan=state.plan)

    applied = state.applied_generation if state.applied_generation is not None else 0
    if applied < state.generation or state.ranks_behind:
        behind = f"; ranks behind: {', '.join(state.ranks_behind)}" if state.ranks_behind else ""
        message = f"previous generation {state.generation} not yet applied (applied: {applied}){behind}"
        return skip(Reason.APPLY_PENDING, message)
    if state.last_rebalance_time is not None:
        cooldown = rounds.cooldown_seconds(policy.cooldown_seconds, state.plan, state.generation)
        left = state.last_rebalance_time + cooldown - now
        if left > 0:
            upcoming = rounds.next_round(state.plan, state.generation)
            return skip(Reason.COOLDOWN, f"cooldown: {left:.0f}s left" + (f" before {upcoming}" if upcoming else ""))
    if data_problem is not None:
        return skip(*data_problem)
    assert sample is not None and staleness is not None

    try:
        planned = rounds.plan_rounds(
            sample.load_LE,
            state.placement_LGS,
            budget=policy.max_moves,
            epsilon=policy.target_epsilon,
            min_gain=policy.min_improvement,
            max_rounds=policy.max_rounds,
            gpus_per_node=gpus_per_node,
            solver=solver,
            target_solver=target_solver,
        )
    except ValueError as error:  # e.g. a hand-written placement with two replicas of one expert on a GPU
        return skip(Reason.INVALID_PLACEMENT, f"cannot plan from the current placement: {error}")
    if not planned.rounds:
        rejected = planned.rejected
        if rejected is None:
            message = f"balancedness {staleness:.3f} is at the target {planned.target_balancedness:.3f} already"
        else:
            message = (
                f"predicted gain {rejected.balancedness - staleness:.3f} < minImprovement {policy.min_improvement:g}"
                f" (balancedness {staleness:.3f} -> {rejected.balancedness:.3f}, {rejected.moves} moves)"
            )
        return Decision(
            Reason.BELOW_MIN_IMPROVEMENT,
            message,
            staleness=staleness,
            predicted_balancedness=rejected.balancedness if rejected else None,
            measured_balancedness=measured,
            plan=rounds.progress_after_stop(state.plan, state.generation),
        )
    first = planned.rounds[0]
    generation = state.generation + 1
    progress = rounds.progress_after_write(state.plan, planned, generation, policy.max_moves)
    groups = {group: mean_balancedness(load, first.placement_LGS) for group, load in sample.group_load_LE.items()}
    worst = (
        f", worst group {min(groups, key=groups.__getitem__)} at {min(groups.values()):.3f}" if len(groups) > 1 else ""
    )
    return Decision(
        Reason.REBALANCED,
        f"generation {generation}: round {progress.round} of {progress.rounds},"
        f" predicted balancedness {staleness:.3f} -> {first.balancedness:.3f}{worst}"
        f" (plan ends at {planned.final_balancedness:.3f}, target {planned.target_balancedness:.3f}),"
        f" {first.moves} experts moved ({first.moves * bytes_per_expert / 1e9:.2f} GB)",
        placement_LGS=first.placement_LGS,
        generation=generation,
        staleness=staleness,
        predicted_balancedness=first.balancedness,
        measured_balancedness=measured,
        moved_experts=first.moves,
        moved_bytes=first.moves * bytes_per_expert,
        plan=progress,
        group_balancedness=groups or None,
    )


def _data_problem(
    policy: Policy, state: PlacementState, sample: LoadSample | None, load_error: str | None
) -> tuple[Reason, str] | None:
    """Why the load cannot be planned on, or None when it can."""
    if sample is None:
        return Reason.METRICS_UNAVAILABLE, f"metrics unavailable: {load_error or 'no load reader'}"
    num_layers = state.placement_LGS.shape[0]
    if sample.load_LE.shape[0] != num_layers:
        return Reason.METRICS_UNAVAILABLE, f"load has {sample.load_LE.shape[0]} layers, the placement {num_layers}"
    if sample.ranks_seen < sample.ranks_expected:
        return Reason.PARTIAL_METRICS, f"partial metrics: {sample.ranks_seen}/{sample.ranks_expected} ranks reporting"
    if sample.num_samples < policy.min_samples:
        return (
            Reason.TOO_FEW_SAMPLES,
            f"too few samples: {sample.num_samples} < {policy.min_samples} in the {sample.window_seconds:g}s window",
        )
    if sample.total_tokens <= 0:
        return Reason.NO_LOAD, f"no tokens routed in the {sample.window_seconds:g}s window"
    return None
