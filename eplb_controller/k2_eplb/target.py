"""Balance-target mode: reach within `epsilon` of the fresh solve's balancedness with as few copies as the search finds.

The reference is our own from-scratch solve (`solve_fresh`) of the same load, its GPUs relabelled to overlap `current`
most (`align_gpus`), per layer. Every layer then runs the incremental search from `current` (parallel per-layer
spending, each layer's budget capped at the copies its fresh solution would cost) and stops at the first placement
within `epsilon` of its reference. Along one layer's search path balancedness never drops, so the first hit is the
cheapest placement that path offers. A layer left short (no single change lowers its max) goes on with a wider choice
of partner GPUs per round; one still short takes its fresh solution, which meets the goal by definition. No layer
therefore costs more copies than its fresh solution, and a larger `epsilon` stops each path no later.

`max_moves` stays a hard cap: when the plan above needs more copies in total, the budgeted `solve` with the cap is
returned instead, flagged as not reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from k2_eplb.align import align_gpus
from k2_eplb.local_search import Origin, improve
from k2_eplb.metrics import FloatArray, IntArray, balancedness, gpu_loads, moves_per_layer
from k2_eplb.solver import solve, solve_fresh
from k2_eplb.validation import check_gpus_per_node, check_load, check_max_moves, check_placement, check_shape

# Rounds of the search per copy a layer may spend: a round spends at most two copies, free swaps (an expert
# returning home) spend none; the search also stops by itself when no change lowers the layer's max load.
_ROUNDS_PER_COPY = 2
_MIN_ROUNDS = 16
_WIDE_PARTNERS = 64  # partner GPUs per round (lightest, and as many spread) for layers the first search left short


@dataclass(frozen=True)
class TargetResult:
    """A placement planned towards a balance target, with what it costs and what it reaches (per layer: [L])."""

    placement: IntArray
    moves_L: IntArray
    balancedness_L: FloatArray
    fresh_balancedness_L: FloatArray
    fresh_moves_L: IntArray
    epsilon: float
    reached: bool  # every layer within epsilon of its fresh balancedness

    @property
    def moves(self) -> int:
        """Copies over all layers."""
        return int(self.moves_L.sum())

    @property
    def balance(self) -> float:
        """Balancedness, mean over layers."""
        return float(self.balancedness_L.mean())

    @property
    def fresh_balance(self) -> float:
        """The fresh solve's balancedness (the reference aimed at), mean over layers."""
        return float(self.fresh_balancedness_L.mean())


def solve_to_target(
    load: npt.ArrayLike,
    num_gpus: int,
    slots_per_gpu: int,
    *,
    current: npt.ArrayLike,
    epsilon: float,
    max_moves: int | None = None,
    gpus_per_node: int | None = None,
) -> TargetResult:
    """Plan from `current` until every layer is within `epsilon` of its fresh solve's balancedness, copying little.

    `max_moves` caps the total copies (None: no cap); when the target needs more, the result is the budgeted `solve`
    within the cap and `reached` is False. Deterministic; raises ValueError naming the bad argument.
    """
    load_LE = check_load(load)
    num_layers, num_experts = load_LE.shape
    gpus, slots = check_shape(num_experts, num_gpus, slots_per_gpu)
    cap = check_max_moves(max_moves)
    per_node = check_gpus_per_node(gpus_per_node, gpus)
    current_LGS = check_placement(current, num_layers, num_experts, (gpus, slots))
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")

    fresh = align_gpus(current_LGS, solve_fresh(load_LE, gpus, slots), num_experts)
    fresh_L = balancedness(load_LE, fresh)
    fresh_moves_L = moves_per_layer(current_LGS, fresh)
    goal_L = fresh_L - float(epsilon)
    origin = Origin.of(current_LGS, num_experts, per_node)
    rounds = _MIN_ROUNDS + _ROUNDS_PER_COPY * int(fresh_moves_L.max(initial=0))
    target_L = gpu_loads(load_LE, current_LGS).mean(axis=1)
    searched, _ = improve(
        load_LE,
        current_LGS,
        origin=origin,
        layer_budget_L=fresh_moves_L,
        target_L=target_L,
        goal_L=goal_L,
        max_rounds=rounds,
    )
    short_L = balancedness(load_LE, searched) < goal_L
    stuck = np.flatnonzero(short_L)
    if len(stuck):  # stopped short (no single change lowered the max): go on with a wider choice of partner GPUs
        left_L = fresh_moves_L[stuck] - moves_per_layer(current_LGS[stuck], searched[stuck])
        searched[stuck], _ = improve(
            load_LE[stuck],
            searched[stuck],
            origin=origin.layers(stuck),
            layer_budget_L=left_L,
            target_L=target_L[stuck],
            goal_L=goal_L[stuck],
            max_rounds=rounds,
            partners=_WIDE_PARTNERS,
        )
        short_L = balancedness(load_LE, searched) < goal_L
    placement: IntArray = np.where(short_L[:, None, None], fresh, searched)
    moves_L = moves_per_layer(current_LGS, placement)
    if cap is not None and int(moves_L.sum()) > cap:
        placement = solve(load_LE, gpus, slots, current=current_LGS, max_moves=cap, gpus_per_node=per_node)
        moves_L = moves_per_layer(current_LGS, placement)
    balance_L = balancedness(load_LE, placement)
    reached = bool((balance_L >= goal_L).all())
    return TargetResult(placement, moves_L, balance_L, fresh_L, fresh_moves_L, float(epsilon), reached)
