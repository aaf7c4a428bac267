"""The EPLB planner: a pure function from (policy, placement state, load, now) to a decision.

It decides, in this order: EPLB disabled; the previous generation still applying; cooldown; load unusable (unreadable,
partial, too few samples, no tokens); otherwise it solves from the current placement within the move budget and
rebalances only when the predicted gain reaches the minimum improvement. No I/O: the controller reads and writes.

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

from k2_eplb import metrics
from k2_eplb.load import LoadSample
from k2_eplb.solver import solve

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


@dataclass(frozen=True)
class PlacementState:
    """The ExpertPlacement as observed: the placement in spec, its generation, and what the workers applied."""

    placement_LGS: IntArray
    generation: int
    applied_generation: int | None
    last_rebalance_time: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to do. `placement_LGS` and `generation` are set only when `rebalance` is true.

    `staleness` is the balancedness of the current placement on the newest load (None when the load is unusable);
    `predicted_balancedness` that of the new placement (None when no solve ran).
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


def mean_balancedness(load_LE: npt.NDArray[np.float64], placement_LGS: IntArray) -> float:
    """Balancedness averaged over layers (each layer: mean GPU load / max GPU load)."""
    return float(metrics.balancedness(load_LE, placement_LGS).mean())


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
) -> Decision:
    """Decide whether to write a new placement generation; `sample` is None when the load could not be read."""
    if not policy.enabled:
        return Decision(Reason.DISABLED, "eplb disabled")
    data_problem = _data_problem(policy, state, sample, load_error)
    staleness = None
    if data_problem is None:
        assert sample is not None
        staleness = mean_balancedness(sample.load_LE, state.placement_LGS)
    measured = sample.measured_balancedness if sample is not None else None

    def skip(reason: Reason, message: str) -> Decision:
        return Decision(reason, message, staleness=staleness, measured_balancedness=measured)

    applied = state.applied_generation if state.applied_generation is not None else 0
    if applied < state.generation:
        message = f"previous generation {state.generation} not yet applied (applied: {applied})"
        return skip(Reason.APPLY_PENDING, message)
    if state.last_rebalance_time is not None:
        left = state.last_rebalance_time + policy.cooldown_seconds - now
        if left > 0:
            return skip(Reason.COOLDOWN, f"cooldown: {left:.0f}s left")
    if data_problem is not None:
        return skip(*data_problem)
    assert sample is not None and staleness is not None

    _, num_gpus, slots_per_gpu = state.placement_LGS.shape
    try:
        solved = solver(
            sample.load_LE,
            num_gpus,
            slots_per_gpu,
            current=state.placement_LGS,
            max_moves=policy.max_moves,
            gpus_per_node=gpus_per_node,
        )
    except ValueError as error:  # e.g. a hand-written placement with two replicas of one expert on a GPU
        return skip(Reason.INVALID_PLACEMENT, f"cannot plan from the current placement: {error}")
    new_LGS = np.asarray(solved, dtype=np.int64)
    predicted = mean_balancedness(sample.load_LE, new_LGS)
    moved = metrics.count_moves(state.placement_LGS, new_LGS)
    gain = predicted - staleness
    if moved == 0 or gain < policy.min_improvement:
        return Decision(
            Reason.BELOW_MIN_IMPROVEMENT,
            f"predicted gain {gain:.3f} < minImprovement {policy.min_improvement:g}"
            f" (balancedness {staleness:.3f} -> {predicted:.3f}, {moved} moves)",
            staleness=staleness,
            predicted_balancedness=predicted,
            measured_balancedness=measured,
        )
    return Decision(
        Reason.REBALANCED,
        f"generation {state.generation + 1}: predicted balancedness {staleness:.3f} -> {predicted:.3f},"
        f" {moved} experts moved ({moved * bytes_per_expert / 1e9:.2f} GB)",
        placement_LGS=new_LGS,
        generation=state.generation + 1,
        staleness=staleness,
        predicted_balancedness=predicted,
        measured_balancedness=measured,
        moved_experts=moved,
        moved_bytes=moved * bytes_per_expert,
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
