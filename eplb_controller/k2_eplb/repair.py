"""Threshold repair: bring every GPU of a layer under a load limit with few copies, vectorised over layers.

Where `local_search.improve` lowers the heaviest GPU one change at a time, this search knows the level it must reach
(`limit_L`, the largest GPU load a layer's goal allows) and values a change by the overload it removes: the sum over
GPUs of the load above an aim a little under the limit. That value is exact for changes anywhere in the layer, so a
round looks at every slot at once and applies several non-conflicting changes per layer:
- re-point: slot (g, t) from expert x (>= 2 replicas) to expert y, one copy. x's other replicas get heavier, y's
  lighter: this is how a hot expert gets the slots of one that went cold, and how an overloaded GPU trades a heavy
  replica for a light one. Its value sums, per expert, the overload change on every GPU holding it;
- swap: a slot of an overloaded GPU with a slot of a light one (two copies, counts unchanged).
Copies are counted against `origin`: an expert put on a GPU that held no replica of it costs one, putting one back
refunds one. Each change is ranked by overload removed per copy. Changes of one round touch distinct GPUs and
distinct experts (their effects could otherwise add up); the next round sees the result.

A layer stops at the first placement whose max load is within its limit (the cheapest its path offers), when nothing
removes overload, or when its budget is spent; one that stops short returns the most balanced placement its path
passed. The path of a layer does not depend on the other layers, and more rounds (or a later deadline) only extend
it, so with more time each layer is either reached sooner in the same place or at least as balanced.
"""

from __future__ import annotations

import time

import numpy as np

from k2_eplb.local_search import BoolArray, Origin, membership
from k2_eplb.metrics import FloatArray, IntArray, replica_counts

_NEW = np.newaxis
_AIM = 0.997
_RELIEF_EXPERTS = 8  # candidate new experts per layer: those whose extra replica removes the most overload
_LIGHT_EXPERTS = 8  # ... and those whose extra replica is lightest (to replace a heavy one on an overloaded GPU)
_SWAP_GPUS = 16  # overloaded GPUs tried for swaps per round, heaviest first
_SWAP_PARTNERS = 16  # lightest GPUs tried as their partners
_PER_ROUND = 4  # changes applied per layer and round, at most
_MIN_GAIN = 1e-12  # relative overload a change must remove


def repair(
    load_LE: FloatArray,
    placement_LGS: IntArray,
    *,
    limit_L: FloatArray,
    origin: Origin,
    layer_budget_L: IntArray | None = None,
    max_rounds: int = 1_000,
    deadline: float | None = None,
) -> tuple[IntArray, IntArray, BoolArray, BoolArray]:
    """Return (placement, copies spent per layer against `origin`, reached per layer, cut per layer: stopped by
    `max_rounds` or the deadline while it could still go on).

    `limit_L`: the largest GPU load allowed per layer. `layer_budget_L`: copies each layer may spend (None:
    unbounded). `deadline`: a `time.process_time()` value after which no new round starts.
    """
    placement = placement_LGS.copy()
    num_layers, num_gpus, _ = placement.shape
    num_experts = load_LE.shape[1]
    counts = replica_counts(placement, num_experts)
    holds = membership(placement, num_experts)
    spent = np.zeros(num_layers, dtype=np.int64)
    peak = _gpu_loads(load_LE, placement, counts, np.arange(num_layers)).max(axis=1)
    reached = peak <= limit_L
    active = ~reached & (num_gpus > 1)
    best = placement.copy()
    best_peak = peak.copy()
    best_spent = spent.copy()
    for _ in range(max_rounds):
        rows = np.flatnonzero(active)
        if not len(rows) or (deadline is not None and time.process_time() >= deadline):
            break
        left = None if layer_budget_L is None else layer_budget_L[rows] - spent[rows]
        found = _round(load_LE, placement, counts, holds, rows, limit_L[rows] * _AIM, origin, left, spent)
        active[rows[~found]] = False
        peak_n = _gpu_loads(load_LE, placement, counts, rows).max(axis=1)
        better = peak_n < best_peak[rows]
        keep = rows[better]
        best[keep], best_peak[keep], best_spent[keep] = placement[keep], peak_n[better], spent[keep]
        hit = peak_n <= limit_L[rows]
        reached[rows[hit]] = True
        active[rows[hit]] = False
    return best, best_spent, reached, active


def _gpu_loads(load_LE: FloatArray, placement: IntArray, counts: IntArray, rows: IntArray) -> FloatArray:
    share = load_LE[rows] / np.maximum(counts[rows], 1)
    flat = placement[rows].reshape(len(rows), -1)
    loads: FloatArray = np.take_along_axis(share, flat, axis=1).reshape(placement[rows].shape).sum(axis=2)
    return loads


def _round(
    load_LE: FloatArray,
    placement: IntArray,
    counts: IntArray,
    holds: BoolArray,
    rows: IntArray,
    aim: FloatArray,
    origin: Origin,
    left: IntArray | None,
    spent: IntArray,
) -> BoolArray:
    """One round on the layers `rows`, in place; returns which of them found a change."""
    n = len(rows)
    r = np.arange(n)
    num_gpus, num_slots = placement.shape[1:]
    num_experts = load_LE.shape[1]
    w = load_LE[rows]
    c = counts[rows].astype(np.float64)
    share = w / c
    P = placement[rows]
    SH = np.take_along_axis(share, P.reshape(n, -1), axis=1).reshape(P.shape)
    gl = SH.sum(axis=2)
    scale = np.maximum(gl.mean(axis=1), 1e-300)
    aim_ = aim[:, _NEW]

    def over(loads: FloatArray, shape_aim: FloatArray) -> FloatArray:
        result: FloatArray = np.maximum(loads - shape_aim, 0.0)
        return result

    base = over(gl, aim_)  # [n, G]
    # per expert: overload change over its GPUs if it loses a replica (dx) or gains one (dy)
    dx = np.where(c >= 2, w / np.maximum(c - 1, 1) - share, np.inf)
    dy = w / (c + 1) - share
    flat_e = (P + num_experts * r[:, _NEW, _NEW]).reshape(-1)
    dx_slot = np.take_along_axis(dx, P.reshape(n, -1), axis=1).reshape(P.shape)
    dy_slot = np.take_along_axis(dy, P.reshape(n, -1), axis=1).reshape(P.shape)
    with np.errstate(invalid="ignore"):
        rem_GS = over(gl[:, :, _NEW] + dx_slot, aim_[:, :, _NEW]) - base[:, :, _NEW]
    add_GS = over(gl[:, :, _NEW] + dy_slot, aim_[:, :, _NEW]) - base[:, :, _NEW]
    removable = np.isfinite(rem_GS)
    rem_E = np.bincount(flat_e, np.where(removable, rem_GS, 0.0).reshape(-1), n * num_experts).reshape(n, -1)
    add_E = np.bincount(flat_e, add_GS.reshape(-1), n * num_experts).reshape(n, -1)

    # --- re-points: every slot (g, t), new expert y from a short list ---------------------------------------------
    k_rel = min(_RELIEF_EXPERTS, num_experts)
    k_light = min(_LIGHT_EXPERTS, num_experts)
    relief = np.argpartition(add_E, k_rel - 1, axis=1)[:, :k_rel]
    light = np.argpartition(w / (c + 1), k_light - 1, axis=1)[:, :k_light]
    ys = np.concatenate([relief, light], axis=1)  # [n, K]
    y_share = np.take_along_axis(w / (c + 1), ys, axis=1)  # [n, K]
    y_add = np.take_along_axis(add_E, ys, axis=1)
    x_rem = np.take_along_axis(rem_E, P.reshape(n, -1), axis=1).reshape(P.shape)  # [n, G, S]
    self_g = over(gl[:, :, _NEW, _NEW] - SH[..., _NEW] + y_share[:, _NEW, _NEW, :], aim_[:, :, _NEW, _NEW])
    delta = (x_rem - rem_GS)[..., _NEW] + y_add[:, _NEW, _NEW, :] + self_g - base[:, :, _NEW, _NEW]  # [n, G, S, K]
    rk = rows[:, _NEW, _NEW]
    y_on_g = holds[rk, ys[:, _NEW, :], np.arange(num_gpus)[_NEW, :, _NEW]]  # [n, G, K]
    ok = removable[..., _NEW] & ~y_on_g[:, :, _NEW, :] & (P[..., _NEW] != ys[:, _NEW, _NEW, :])
    new_cost = ~origin.holds_LEG[rk, ys[:, _NEW, :], np.arange(num_gpus)[_NEW, :, _NEW]]  # [n, G, K]
    x_refund = ~origin.holds_LEG[rows[:, _NEW, _NEW], P, np.arange(num_gpus)[_NEW, :, _NEW]]  # [n, G, S]
    rp_cost = new_cost[:, :, _NEW, :].astype(np.int64) - x_refund[..., _NEW]
    if left is not None:
        ok &= rp_cost <= left[:, _NEW, _NEW, _NEW]
    gain = -delta / scale[:, _NEW, _NEW, _NEW]
    ok &= gain > _MIN_GAIN
    rp_score = np.where(ok, gain / np.maximum(rp_cost, 0.5), -np.inf).reshape(n, num_gpus, -1)
    rp_pick = np.argmax(rp_score, axis=2)  # best per GPU [n, G]
    rp_best = np.take_along_axis(rp_score, rp_pick[..., _NEW], axis=2)[..., 0]
    rp_t, rp_k = np.divmod(rp_pick, ys.shape[1])
    rp_x = np.take_along_axis(P, rp_t[..., _NEW], axis=2)[..., 0]
    rp_y = np.take_along_axis(ys, rp_k, axis=1)
    rp_c = np.take_along_axis(rp_cost.reshape(n, num_gpus, -1), rp_pick[..., _NEW], axis=2)[..., 0]

    # --- swaps: the heaviest GPUs with the lightest ------------------------------------------------------------------
    order = np.argsort(-gl, axis=1, kind="stable")
    k_sw = min(_SWAP_GPUS, num_gpus // 2)
    m = min(_SWAP_PARTNERS, num_gpus - k_sw)
    heavy = order[:, :k_sw]
    lightg = order[:, num_gpus - m :]
    a = SH[r[:, _NEW], heavy][:, :, :, _NEW, _NEW]  # [n, h, S, 1, 1]
    b = SH[r[:, _NEW], lightg][:, _NEW, _NEW]  # [n, 1, 1, m, S]
    gh = gl[r[:, _NEW], heavy][:, :, _NEW, _NEW, _NEW]
    gm = gl[r[:, _NEW], lightg][:, _NEW, _NEW, :, _NEW]
    aim5 = aim[:, _NEW, _NEW, _NEW, _NEW]
    sw_delta = over(gh - a + b, aim5) + over(gm + a - b, aim5) - over(gh, aim5) - over(gm, aim5)
    xh = P[r[:, _NEW], heavy]  # [n, h, S]
    zm = P[r[:, _NEW], lightg]  # [n, m, S]
    x_on_m = holds[rows[:, _NEW, _NEW, _NEW], xh[..., _NEW], lightg[:, _NEW, _NEW, :]]  # [n, h, S, m]
    z_on_h = holds[rows[:, _NEW, _NEW, _NEW], zm[:, _NEW], heavy[:, :, _NEW, _NEW]]  # [n, h, m, S]
    sw_ok = ~x_on_m[..., _NEW] & ~z_on_h[:, :, _NEW]
    o = origin.holds_LEG
    sw_cost = (
        (~o[rows[:, _NEW, _NEW, _NEW], xh[..., _NEW], lightg[:, _NEW, _NEW, :]]).astype(np.int64)[..., _NEW]
        + (~o[rows[:, _NEW, _NEW, _NEW], zm[:, _NEW], heavy[:, :, _NEW, _NEW]])[:, :, _NEW]
        - (~o[rows[:, _NEW, _NEW], xh, heavy[..., _NEW]])[..., _NEW, _NEW]
        - (~o[rows[:, _NEW, _NEW], zm, lightg[..., _NEW]])[:, _NEW, _NEW]
    )
    if left is not None:
        sw_ok &= sw_cost <= left[:, _NEW, _NEW, _NEW, _NEW]
    sw_gain = -sw_delta / scale[:, _NEW, _NEW, _NEW, _NEW]
    sw_ok &= sw_gain > _MIN_GAIN
    sw_score = np.where(sw_ok, sw_gain / np.maximum(sw_cost, 0.5), -np.inf).reshape(n, k_sw, -1)
    sw_pick = np.argmax(sw_score, axis=2)
    sw_best = np.take_along_axis(sw_score, sw_pick[..., _NEW], axis=2)[..., 0]  # [n, h]
    sw_s, sw_j, sw_u = np.unravel_index(sw_pick, (num_slots, m, num_slots))
    sw_c = np.take_along_axis(sw_cost.reshape(n, k_sw, -1), sw_pick[..., _NEW], axis=2)[..., 0]

    # --- choose per layer: best first, skipping any change that touches a GPU an earlier one of the round touched ---
    score = np.concatenate([rp_best, sw_best], axis=1)  # [n, G + h]
    found: BoolArray = np.isfinite(score).any(axis=1)
    cost = np.concatenate([rp_c, sw_c], axis=1)
    order_c = np.argsort(-score, axis=1, kind="stable")[:, : 4 * _PER_ROUND]
    used = np.zeros((n, num_gpus), dtype=bool)
    take = np.zeros(order_c.shape, dtype=bool)
    budget = None if left is None else left.copy()
    gpus = np.arange(num_gpus)
    for k in range(order_c.shape[1]):
        col = order_c[:, k]
        is_rp = col < num_gpus
        g_rp = np.minimum(col, num_gpus - 1)
        h_sw = np.minimum(np.maximum(col - num_gpus, 0), k_sw - 1)
        touch = np.where(
            is_rp[:, _NEW],
            holds[rows, rp_x[r, g_rp]] | holds[rows, rp_y[r, g_rp]] | (gpus == g_rp[:, _NEW]),
            (gpus == heavy[r, h_sw][:, _NEW]) | (gpus == lightg[r, sw_j[r, h_sw]][:, _NEW]),
        )
        ok = np.isfinite(score[r, col]) & ~(touch & used).any(axis=1) & (take.sum(axis=1) < _PER_ROUND)
        if budget is not None:
            ok &= cost[r, col] <= budget
            budget -= np.where(ok, cost[r, col], 0)
        used |= touch & ok[:, _NEW]
        take[:, k] = ok
    li, ci = np.nonzero(take)
    col = order_c[li, ci]
    lay = rows[li]
    is_rp = col < num_gpus
    # re-points
    g = col[is_rp]
    lr = li[is_rp]
    t = rp_t[lr, g]
    x = placement[lay[is_rp], g, t]
    y = rp_y[lr, g]
    placement[lay[is_rp], g, t] = y
    counts[lay[is_rp], x] -= 1
    counts[lay[is_rp], y] += 1
    holds[lay[is_rp], x, g] = False
    holds[lay[is_rp], y, g] = True
    # swaps
    hi = col[~is_rp] - num_gpus
    ls = li[~is_rp]
    ga, sa = heavy[ls, hi], sw_s[ls, hi]
    gb, sb = lightg[ls, sw_j[ls, hi]], sw_u[ls, hi]
    lw = lay[~is_rp]
    xa, zb = placement[lw, ga, sa], placement[lw, gb, sb]
    placement[lw, ga, sa] = zb
    placement[lw, gb, sb] = xa
    holds[lw, xa, ga] = False
    holds[lw, zb, gb] = False
    holds[lw, xa, gb] = True
    holds[lw, zb, ga] = True
    np.add.at(spent, lay, cost[li, col])
    return found
