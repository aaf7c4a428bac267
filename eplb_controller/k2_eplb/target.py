"""Balance-target mode: reach within `epsilon` of the fresh solve's balancedness with as few copies as the search finds.

The reference is our own from-scratch solve (`solve_fresh`) of the same load, its GPUs relabelled to overlap `current`
most (`align_gpus`), per layer; its balancedness minus `epsilon` is the layer's goal, i.e. a largest GPU load.
Candidates per layer, from `current`, each capped at the copies the fresh solution would cost:
1. the threshold repair (`repair.repair`): overload above the limit removed by re-points, chains and swaps, the
   first placement under the limit kept; with `paths` > 1, also along other paths (`_PATHS`);
2. for layers the first path left stuck (no change removes overload), the same repair aiming lower;
3. for layers still short, the older search (`local_search.improve` towards the goal, then wider partners).
Each candidate gives back the copies its limit does not need (`repair.prune`); every one that reaches the goal
competes on copies, and the aligned fresh solution, which meets the goal by definition, always competes: no layer
costs more copies than its fresh solution.

`over="mean"` aims at the mean over layers instead (what balancedness measures): the steps above run at several
goals per layer (`_RUNGS`), and `allocate.allocate` spends copies where they buy the most balance (see `_spread`).

`deadline_s` (CPU seconds of this call, `time.process_time`) makes it an anytime search: at the deadline a layer
the repair had not finished takes the best placement its path has passed (possibly short of the goal, `reached`
False), and steps 2-3 start only before it. Each layer's path does not depend on the others or on the deadline, so a
later deadline never leaves a layer less balanced (up to its goal), and a layer that reaches its goal with an earlier
deadline reaches it with a later one at no more copies. The fresh solve and the alignment come first and are not
cut: 0.3-0.7 s at K2's shape.

`max_moves` stays a hard cap: when the plan above needs more copies in total, the budgeted `solve` with the cap is
returned instead, flagged as not reached.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from k2_eplb.align import align_gpus
from k2_eplb.allocate import allocate
from k2_eplb.local_search import BoolArray, Origin, improve
from k2_eplb.metrics import FloatArray, IntArray, balancedness, gpu_loads, moves_per_layer
from k2_eplb.repair import prune, repair
from k2_eplb.solver import solve, solve_fresh
from k2_eplb.validation import check_gpus_per_node, check_load, check_max_moves, check_placement, check_shape

# Rounds of the search per copy a layer may spend: a round spends at most two copies, free swaps (an expert
# returning home) spend none; the search also stops by itself when no change lowers the layer's max load.
_ROUNDS_PER_COPY = 2
_MIN_ROUNDS = 16
_RETRY_AIMS = (0.99, 0.98)  # the repair's aims tried again on layers its first path left stuck
_WIDE_PARTNERS = 64  # partner GPUs per round (lightest, and as many spread) for layers the first search left short
# `paths` > 1: the repair's other paths (aim, changes per round), tried in this order after its default one
_PATHS = ((0.999, 2), (0.995, 2), (0.999, 4), (0.997, 2), (0.995, 4))
_RUNGS = (2.0, 1.5, 1.0, 0.75, 0.5)  # over="mean": the ladder's goals, epsilon x these below fresh
_SUM_SLACK = 1e-9  # over="mean": the summed balancedness aimed a little above the need (rounding of the mean)


@dataclass(frozen=True)
class TargetResult:
    """A placement planned towards a balance target, with what it costs and what it reaches (per layer: [L])."""

    placement: IntArray
    moves_L: IntArray
    balancedness_L: FloatArray
    fresh_balancedness_L: FloatArray
    fresh_moves_L: IntArray
    epsilon: float
    reached: bool  # every layer within epsilon of its fresh balancedness (over="mean": see `solve_to_target`)
    over: str = "layer"
    floor_epsilon: float | None = None  # over="mean": how far below its fresh balancedness a layer may stay

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
    deadline_s: float | None = None,
    over: str = "layer",
    floor_epsilon: float | None = None,
    paths: int = 1,
) -> TargetResult:
    """Plan from `current` until every layer is within `epsilon` of its fresh solve's balancedness, copying little.

        `max_moves` caps the total copies (None: no cap); when the target needs more, the result is the budgeted `solve`
        within the cap and `reached` is False. `deadline_s`: CPU seconds for the search (None: until done), see the
        module. `over`: "layer" (every layer within `epsilon` of its fresh balancedness) or "mean" (the mean over layers
        within `epsilon` of the fresh mean, every layer within `floor_epsilon`, default 2 x `epsilon`, of its own; see
        `_spread`). `paths`: repair paths per goal (1 to 6; each from `current`, with another aim and number of changes
    per round, `_PATHS`): more find fewer copies, at about that many times the CPU. Deterministic without a deadline;
    raises ValueError naming the bad argument.
    """
    load_LE = check_load(load)
    num_layers, num_experts = load_LE.shape
    gpus, slots = check_shape(num_experts, num_gpus, slots_per_gpu)
    cap = check_max_moves(max_moves)
    per_node = check_gpus_per_node(gpus_per_node, gpus)
    current_LGS = check_placement(current, num_layers, num_experts, (gpus, slots))
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
    if over not in ("layer", "mean"):
        raise ValueError(f"over: must be 'layer' or 'mean', got {over!r}")
    floor = 2.0 * float(epsilon) if floor_epsilon is None else _check_floor(floor_epsilon, float(epsilon))
    if isinstance(paths, bool) or not isinstance(paths, int) or not 1 <= paths <= 1 + len(_PATHS):
        raise ValueError(f"paths: must be an integer from 1 to {1 + len(_PATHS)}, got {paths!r}")

    started = time.process_time()
    deadline = None if deadline_s is None else started + _check_seconds(deadline_s)
    fresh = align_gpus(current_LGS, solve_fresh(load_LE, gpus, slots), num_experts)
    fresh_L = balancedness(load_LE, fresh)
    fresh_moves_L = moves_per_layer(current_LGS, fresh)
    origin = Origin.of(current_LGS, num_experts, per_node)
    if over == "mean":
        placement = _spread(load_LE, current_LGS, fresh, origin, float(epsilon), floor, deadline, paths)
    else:
        placement, _ = _per_layer(load_LE, current_LGS, fresh, origin, fresh_L - float(epsilon), deadline, paths)
    moves_L = moves_per_layer(current_LGS, placement)
    if cap is not None and int(moves_L.sum()) > cap:
        placement = solve(load_LE, gpus, slots, current=current_LGS, max_moves=cap, gpus_per_node=per_node)
        moves_L = moves_per_layer(current_LGS, placement)
    balance_L = balancedness(load_LE, placement)
    if over == "mean":
        reached = balance_L.mean() >= fresh_L.mean() - epsilon - 1e-12 and bool((balance_L >= fresh_L - floor).all())
        return TargetResult(
            placement, moves_L, balance_L, fresh_L, fresh_moves_L, float(epsilon), bool(reached), over, floor
        )
    reached = bool((balance_L >= fresh_L - epsilon).all())
    return TargetResult(placement, moves_L, balance_L, fresh_L, fresh_moves_L, float(epsilon), reached)


def _per_layer(
    load_LE: FloatArray,
    current_LGS: IntArray,
    fresh: IntArray,
    origin: Origin,
    goal_L: FloatArray,
    deadline: float | None,
    paths: int = 1,
) -> tuple[IntArray, BoolArray]:
    """Every layer at its goal with the fewest copies its candidates offer (see the module), and which layers the
    deadline cut (those keep the best placement their repair had passed)."""
    num_layers = load_LE.shape[0]
    fresh_moves_L = moves_per_layer(current_LGS, fresh)
    # every candidate that reaches its layer's goal competes, the fewest copies wins; the fresh solution always does
    best = fresh.copy()
    best_moves_L = fresh_moves_L.copy()

    all_rows = np.arange(num_layers)
    limit_L = _limit(gpu_loads(load_LE, current_LGS).mean(axis=1), goal_L)

    def offer(rows: IntArray, placement_nGS: IntArray) -> None:
        # copies a later change of the path made unneeded go back first
        placement_nGS = prune(load_LE[rows], placement_nGS, current_LGS[rows], limit_L=limit_L[rows])
        moves_n = moves_per_layer(current_LGS[rows], placement_nGS)
        wins = (balancedness(load_LE[rows], placement_nGS) >= goal_L[rows]) & (moves_n < best_moves_L[rows])
        best[rows[wins]] = placement_nGS[wins]
        best_moves_L[rows[wins]] = moves_n[wins]

    repaired, _, reached_L, cut_L = repair(
        load_LE, current_LGS, limit_L=limit_L, origin=origin, layer_budget_L=fresh_moves_L, deadline=deadline
    )
    offer(all_rows, repaired)
    for aim, per_round in _PATHS[: paths - 1]:  # more paths from the current placement compete
        if deadline is not None and time.process_time() >= deadline:
            break
        other, *_ = repair(
            load_LE,
            current_LGS,
            limit_L=limit_L,
            origin=origin,
            layer_budget_L=fresh_moves_L,
            deadline=deadline,
            aim=aim,
            per_round=per_round,
        )
        offer(all_rows, other)  # stuck below stays the first path's: every path only adds candidates
    stuck = ~reached_L & ~cut_L  # no change removed overload: other paths, then the older search, then fresh
    for aim in _RETRY_AIMS:
        rows = np.flatnonzero(stuck)
        if not len(rows) or (deadline is not None and time.process_time() >= deadline):
            break
        retried, _, hit, _ = repair(
            load_LE[rows],
            current_LGS[rows],
            limit_L=limit_L[rows],
            origin=origin.layers(rows),
            layer_budget_L=fresh_moves_L[rows],
            deadline=deadline,
            aim=aim,
        )
        offer(rows, retried)
        stuck[rows[hit]] = False
    rows = np.flatnonzero(stuck)
    if len(rows) and (deadline is None or time.process_time() < deadline):
        budget_L, goal_n = fresh_moves_L[rows], goal_L[rows]
        offer(rows, _search(load_LE[rows], current_LGS[rows], origin.layers(rows), budget_L, goal_n))
    placement: IntArray = np.where(cut_L[:, None, None], repaired, best)  # cut by the deadline: the best so far
    return placement, cut_L


def _spread(
    load_LE: FloatArray,
    current_LGS: IntArray,
    fresh: IntArray,
    origin: Origin,
    epsilon: float,
    floor: float,
    deadline: float | None,
    paths: int,
) -> IntArray:
    """The mean within `epsilon` of the fresh mean, each layer within `floor` of its fresh balancedness, few copies.

    The per-layer search runs from `current_LGS` at goals from `floor` below each layer's fresh balancedness up to
    half of `epsilon` below it (`_RUNGS`), which gives every layer a copies-vs-balance frontier (starting each goal
    from the last one's placement cost more copies). The candidates per layer are the current placement, each goal's
    placement and the aligned fresh solution; `allocate` picks one per layer, unless every layer at `epsilon` costs
    no more. A deadline stops the goals: those finished by then are the candidates (the fresh solution only when all
    finished), and a layer's floor is what they reach.
    """
    fresh_L = balancedness(load_LE, fresh)
    rungs = sorted({min(floor, epsilon * rung) for rung in _RUNGS} | {floor}, reverse=True)
    candidates = [current_LGS]
    finished = True
    for rung in rungs:
        if deadline is not None and time.process_time() >= deadline:
            finished = False
            break
        placed, cut_L = _per_layer(load_LE, current_LGS, fresh, origin, fresh_L - rung, deadline, paths)
        candidates.append(placed)
        finished &= not cut_L.any()
    if finished:
        candidates.append(fresh)
    stack_KLGS = np.stack(candidates)
    moves_LK = np.stack([moves_per_layer(current_LGS, c) for c in candidates], axis=1)
    balance_LK = np.stack([balancedness(load_LE, c) for c in candidates], axis=1)
    floor_L = np.minimum(fresh_L - floor, balance_LK.max(axis=1))
    rows = np.arange(len(fresh_L))
    pick_L = allocate(moves_LK, balance_LK, (fresh_L.mean() - epsilon) * len(fresh_L) + _SUM_SLACK, floor_L)
    uniform = 1 + rungs.index(epsilon)  # every layer within epsilon: what over="layer" returns
    if finished and moves_LK[:, uniform].sum() <= moves_LK[rows, pick_L].sum():
        pick_L = np.full(len(rows), uniform)
    picked: IntArray = stack_KLGS[pick_L, rows]
    return picked


def _limit(mean_L: FloatArray, goal_L: FloatArray) -> FloatArray:
    """The largest GPU load at which a layer of GPU mean load `mean_L` has balancedness `goal_L`."""
    limit: FloatArray = np.where(goal_L > 0, mean_L / np.maximum(goal_L, 1e-300), np.inf) * (1 + 1e-12)
    return limit


def _check_floor(floor_epsilon: object, epsilon: float) -> float:
    if (
        isinstance(floor_epsilon, bool)
        or not isinstance(floor_epsilon, (int, float))
        or not math.isfinite(floor_epsilon)
        or floor_epsilon < epsilon
    ):
        raise ValueError(f"floor_epsilon: must be a finite number >= epsilon ({epsilon}), got {floor_epsilon!r}")
    return float(floor_epsilon)


def _check_seconds(deadline_s: object) -> float:
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s >= 0:
        raise ValueError(f"deadline_s: must be a number of seconds >= 0 or None, got {deadline_s!r}")
    return float(deadline_s)


def _search(
    load_LE: FloatArray, current_LGS: IntArray, origin: Origin, budget_L: IntArray, goal_L: FloatArray
) -> IntArray:
    """`local_search.improve` from `current_LGS` with per-layer budgets, stopping at the goal; layers it leaves short
    go on with a wider choice of partner GPUs."""
    rounds = _MIN_ROUNDS + _ROUNDS_PER_COPY * int(budget_L.max(initial=0))
    target_L = gpu_loads(load_LE, current_LGS).mean(axis=1)
    searched, _ = improve(
        load_LE,
        current_LGS,
        origin=origin,
        layer_budget_L=budget_L,
        target_L=target_L,
        goal_L=goal_L,
        max_rounds=rounds,
    )
    stuck = np.flatnonzero(balancedness(load_LE, searched) < goal_L)
    if len(stuck):
        left_L = budget_L[stuck] - moves_per_layer(current_LGS[stuck], searched[stuck])
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
    return searched
