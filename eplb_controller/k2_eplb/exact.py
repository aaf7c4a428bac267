"""The exact reference: the fewest copies that bring a layer's max GPU load under a limit, as a MILP (HiGHS).

For small cases only (a few layers, up to a few dozen GPUs and experts): it checks how far the heuristics are from
the optimum. Layers are independent, so each is one MILP. Binary v[e, g, k]: expert e sits on GPU g and has k
replicas; binary z[e, k]: expert e has k replicas. Then, per layer,

    sum_k z[e, k] = 1                       every expert gets one replica count (k >= 1)
    sum_g v[e, g, k] = k * z[e, k]          ... and exactly that many distinct GPUs
    v[e, g, k] <= z[e, k]                   (implied; it tightens the relaxation)
    sum_{e, k} v[e, g, k] = slots per GPU   every slot filled
    sum_{e, k} (load[e] / k) v[e, g, k] <= limit
    minimise sum over (e, g) not held in `current` of sum_k v[e, g, k]    (copies, as `metrics.count_moves`)

Counts whose share alone exceeds the limit are left out. `highspy` (the HiGHS solver, from PyPI) is imported only
when a MILP is solved, so the rest of the package does not need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from k2_eplb.metrics import FloatArray, IntArray, gpu_loads


@dataclass(frozen=True)
class ExactResult:
    """Per layer [L]: the fewest copies (-1 where no placement meets the limit), whether HiGHS proved it optimal,
    and the placement [L, G, S] it found (the current layer where none exists)."""

    moves_L: IntArray
    optimal_L: np.ndarray
    placement: IntArray


def min_moves(
    load_LE: FloatArray, current_LGS: IntArray, limit_L: FloatArray, *, time_limit_s: float = 30.0
) -> ExactResult:
    """The fewest copies per layer from `current_LGS` such that no GPU load exceeds `limit_L` (see the module)."""
    highspy = _highspy()
    num_layers = load_LE.shape[0]
    moves = np.full(num_layers, -1, dtype=np.int64)
    optimal = np.zeros(num_layers, dtype=bool)
    placement = current_LGS.copy()
    for layer in range(num_layers):
        found = _solve_layer(highspy, load_LE[layer], current_LGS[layer], float(limit_L[layer]), time_limit_s)
        if found is not None:
            placement[layer], moves[layer], optimal[layer] = found
    return ExactResult(moves, optimal, placement)


def limit_for_goal(load_LE: FloatArray, current_LGS: IntArray, goal_L: FloatArray) -> FloatArray:
    """The max GPU load at which a layer's balancedness is `goal_L` (the mean GPU load does not depend on the
    placement), with a relative tolerance of 1e-9 for rounding."""
    mean_L = gpu_loads(load_LE, current_LGS).mean(axis=1)
    limit: FloatArray = mean_L / goal_L * (1 + 1e-9)
    return limit


def _highspy() -> Any:
    try:
        import highspy
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("k2_eplb.exact needs the HiGHS solver: pip install highspy") from error
    return highspy


def _solve_layer(
    highspy: Any, load_E: FloatArray, current_GS: IntArray, limit: float, time_limit_s: float
) -> tuple[IntArray, int, bool] | None:
    num_gpus, slots = current_GS.shape
    num_experts = load_E.shape[0]
    max_count = min(num_gpus, num_gpus * slots - num_experts + 1)
    if max_count < 1:
        return None
    # (e, k) pairs allowed: share load/k within the limit
    pairs = [(e, k) for e in range(num_experts) for k in range(1, max_count + 1) if load_E[e] / k <= limit]
    if {e for e, _ in pairs} != set(range(num_experts)):
        return None
    num_pairs = len(pairs)
    pair_e = np.array([e for e, _ in pairs])
    pair_k = np.array([k for _, k in pairs])
    held = np.zeros((num_experts, num_gpus), dtype=bool)
    held[current_GS, np.arange(num_gpus)[:, None]] = True
    # columns: v[p, g] for every pair p and GPU g (p-major), then z[p]
    num_v = num_pairs * num_gpus
    v_col = np.arange(num_v).reshape(num_pairs, num_gpus)
    z_col = num_v + np.arange(num_pairs)
    cost = np.concatenate([(~held[pair_e]).astype(np.float64).ravel(), np.zeros(num_pairs)])
    rows: list[tuple[IntArray, FloatArray, float, float]] = []
    for e in range(num_experts):  # one count per expert
        cols = z_col[pair_e == e]
        rows.append((cols, np.ones(len(cols)), 1.0, 1.0))
    for p in range(num_pairs):  # k distinct GPUs for the chosen count
        rows.append((np.append(v_col[p], z_col[p]), np.append(np.ones(num_gpus), -float(pair_k[p])), 0.0, 0.0))
    for g in range(num_gpus):
        rows.append((v_col[:, g], np.ones(num_pairs), float(slots), float(slots)))
        rows.append((v_col[:, g], load_E[pair_e] / pair_k / limit, -math.inf, 1.0))  # scaled: limit 1
    # the tightening rows v[p, g] - z[p] <= 0, all at once
    tight_cols = np.stack([v_col.ravel(), np.repeat(z_col, num_gpus)], axis=1)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("threads", 1)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    inf = highspy.kHighsInf
    num_cols = num_v + num_pairs
    h.addVars(num_cols, np.zeros(num_cols), np.ones(num_cols))
    h.changeColsCost(num_cols, np.arange(num_cols, dtype=np.int32), cost)
    h.changeColsIntegrality(
        num_cols, np.arange(num_cols, dtype=np.int32), np.full(num_cols, highspy.HighsVarType.kInteger)
    )
    starts, index, value, lower, upper = [], [], [], [], []
    offset = 0
    for cols, coefs, low, up in rows:
        starts.append(offset)
        index.append(cols)
        value.append(coefs)
        lower.append(-inf if math.isinf(low) else low)
        upper.append(up)
        offset += len(cols)
    num_tight = len(tight_cols)
    starts += list(offset + 2 * np.arange(num_tight))
    index.append(tight_cols.ravel())
    value.append(np.tile([1.0, -1.0], num_tight))
    lower += [-inf] * num_tight
    upper += [0.0] * num_tight
    h.addRows(
        len(starts),
        np.array(lower),
        np.array(upper),
        int(sum(len(i) for i in index)),
        np.array(starts, dtype=np.int32),
        np.concatenate(index).astype(np.int32),
        np.concatenate(value),
    )
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None
    if h.getInfo().primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
        return None  # no feasible solution found within the time limit
    values = np.asarray(h.getSolution().col_value)
    on = values[:num_v].reshape(num_pairs, num_gpus) > 0.5
    placement = np.empty((num_gpus, slots), dtype=np.int64)
    for g in range(num_gpus):
        experts = pair_e[on[:, g]]
        assert len(experts) == slots
        placement[g] = experts
    moves = int(((~held) & _holds(placement, num_experts)).sum())
    return placement, moves, status == highspy.HighsModelStatus.kOptimal


def _holds(placement_GS: IntArray, num_experts: int) -> np.ndarray:
    holds = np.zeros((num_experts, placement_GS.shape[0]), dtype=bool)
    holds[placement_GS, np.arange(placement_GS.shape[0])[:, None]] = True
    return holds
