"""Rebalancing in rounds: when one rebalance's move budget cannot reach the balance target, a sequence of placements.

The target is the fresh solve's balancedness minus `epsilon` (`solve_to_target` computes that reference and the
fewest copies the search finds to reach it). When those copies fit in the budget, the plan is one round: that
placement. Otherwise every round is the budgeted `solve` from the previous round's placement, and the plan stops at
the first round that reaches the target, at the first round that gains less than `min_gain`, or after `max_rounds`.
Every round therefore stays within the budget and raises the predicted balancedness by at least `min_gain`.

Only the first round is written; the controller stores the plan's progress (`Progress`, ExpertPlacement
status.rebalancePlan), not its placements. The next round re-plans from the placement in force on the newest load:
with the same load this is the plan's next round (the solvers are deterministic); after a load shift it is a new plan
from where the rollout stands, numbered on from the rounds already written.

Shapes: L MoE layers, E logical experts, G ranks (GPUs) of one group, S slots per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from k2_eplb import metrics
from k2_eplb.solver import solve
from k2_eplb.target import TargetResult, solve_to_target

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
SolveFn = Callable[..., IntArray]
TargetFn = Callable[..., TargetResult]


@dataclass(frozen=True)
class Round:
    """One placement of a plan: its slot tables, its predicted balancedness, the copies it costs from the one before."""

    placement_LGS: IntArray
    balancedness: float
    moves: int


@dataclass(frozen=True)
class Plan:
    """Rounds from `start_balancedness` towards `target_balancedness` (empty: no round gains enough); `rejected` is
    the round after the last one, solved but not kept because it gained less than the minimum (None: not solved)."""

    rounds: tuple[Round, ...]
    start_balancedness: float
    target_balancedness: float
    fresh_balancedness: float
    rejected: Round | None = None

    @property
    def final_balancedness(self) -> float:
        return self.rounds[-1].balancedness if self.rounds else self.start_balancedness

    @property
    def reaches_target(self) -> bool:
        return self.final_balancedness >= self.target_balancedness


@dataclass(frozen=True)
class Progress:
    """Where a plan stands (ExpertPlacement status.rebalancePlan): `round` of `rounds` written, as `generation`."""

    round: int
    rounds: int
    generation: int
    predicted_balancedness: float
    target_balancedness: float
    moves_per_round: int | None

    @property
    def in_progress(self) -> bool:
        """Rounds remain after the one written."""
        return self.round < self.rounds

    def continues_at(self, generation: int) -> bool:
        """Whether the plan goes on from spec.generation `generation`: rounds remain and nothing else wrote spec."""
        return self.in_progress and self.generation == generation

    def to_status(self) -> dict[str, Any]:
        """The wire form of status.rebalancePlan."""
        wire: dict[str, Any] = {
            "round": self.round,
            "rounds": self.rounds,
            "generation": self.generation,
            "predictedBalancedness": _unit(self.predicted_balancedness),
            "targetBalancedness": _unit(self.target_balancedness),
        }
        if self.moves_per_round is not None:
            wire["movesPerRound"] = self.moves_per_round
        return wire

    @classmethod
    def from_status(cls, wire: Any) -> Progress | None:
        """From the status model (`k2_api.placement.RebalancePlan`) or None."""
        if wire is None:
            return None
        return cls(
            round=wire.round,
            rounds=wire.rounds,
            generation=wire.generation,
            predicted_balancedness=wire.predicted_balancedness,
            target_balancedness=wire.target_balancedness,
            moves_per_round=wire.moves_per_round,
        )


def _unit(value: float) -> float:
    """A balancedness clipped into [0, 1] (the CRD's bounds) against float rounding."""
    return min(1.0, max(0.0, float(value)))


def plan_rounds(
    load_LE: FloatArray,
    current_LGS: IntArray,
    *,
    budget: int | None,
    epsilon: float,
    min_gain: float,
    max_rounds: int,
    gpus_per_node: int | None = None,
    solver: SolveFn = solve,
    target_solver: TargetFn = solve_to_target,
) -> Plan:
    """The rounds from `current_LGS` towards the fresh balancedness minus `epsilon` on `load_LE` (see the module)."""
    assert max_rounds >= 1
    _, num_gpus, slots = current_LGS.shape
    start = mean_balancedness(load_LE, current_LGS)
    aim = target_solver(
        load_LE, num_gpus, slots, current=current_LGS, epsilon=epsilon, max_moves=None, gpus_per_node=gpus_per_node
    )
    target = aim.fresh_balance - epsilon

    def plan(rounds: list[Round], rejected: Round | None = None) -> Plan:
        return Plan(tuple(rounds), start, target, aim.fresh_balance, rejected)

    if budget is None or aim.moves <= budget:
        aimed = np.asarray(aim.placement, dtype=np.int64)
        reached = Round(aimed, mean_balancedness(load_LE, aimed), metrics.count_moves(current_LGS, aimed))
        return plan([reached]) if reached.moves > 0 and reached.balancedness - start >= min_gain else plan([], reached)
    rounds: list[Round] = []
    placement, balance = current_LGS, start
    while len(rounds) < max_rounds and balance < target:
        solved = solver(load_LE, num_gpus, slots, current=placement, max_moves=budget, gpus_per_node=gpus_per_node)
        step = np.asarray(solved, dtype=np.int64)
        moved = metrics.count_moves(placement, step)
        gained = mean_balancedness(load_LE, step)
        assert moved <= budget, f"the solver moved {moved} > budget {budget}"
        if moved == 0 or gained - balance < min_gain:
            return plan(rounds, Round(step, gained, moved))
        rounds.append(Round(step, gained, moved))
        placement, balance = step, gained
    return plan(rounds)


def progress_after_write(previous: Progress | None, plan: Plan, generation: int, budget: int | None) -> Progress:
    """The progress once the plan's first round is written as `generation`, numbered on from `previous` when that plan
    was still in progress at `generation - 1`."""
    assert plan.rounds
    done = previous.round if previous is not None and previous.continues_at(generation - 1) else 0
    return Progress(
        round=done + 1,
        rounds=done + len(plan.rounds),
        generation=generation,
        predicted_balancedness=plan.final_balancedness,
        target_balancedness=plan.target_balancedness,
        moves_per_round=budget,
    )


def progress_after_stop(previous: Progress | None, generation: int) -> Progress | None:
    """A plan in progress at `generation` whose next round gains too little ends at the round written."""
    if previous is None or not previous.continues_at(generation):
        return previous
    return replace(previous, rounds=previous.round)


def cooldown_seconds(cooldown: float, previous: Progress | None, generation: int) -> float:
    """The wait after the write of `generation`: `cooldown` / rounds between the rounds of a plan (a whole plan waits
    about one cooldown between its rounds), the full `cooldown` after its last round and after a single rebalance."""
    if previous is not None and previous.continues_at(generation):
        return cooldown / previous.rounds
    return cooldown


def next_round(previous: Progress | None, generation: int) -> str | None:
    """ "round i of n" for the plan's next round when it continues from `generation`, else None."""
    if previous is None or not previous.continues_at(generation):
        return None
    return f"round {previous.round + 1} of {previous.rounds}"


def mean_balancedness(load_LE: FloatArray, placement_LGS: IntArray) -> float:
    """Balancedness averaged over layers (each layer: mean GPU load / max GPU load)."""
    return float(metrics.balancedness(load_LE, placement_LGS).mean())
