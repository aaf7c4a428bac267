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
from dataclasses import dataclass

import numpy as np

from k2_eplb.local_search import BoolArray, Origin, membership
from k2_eplb.metrics import FloatArray, IntArray, replica_counts

_NEW = np.newaxis
_AIM = 0.997  # aim at this fraction of the limit: GPUs just under it are still pushed down a little
_RELIEF_EXPERTS = 8  # candidate new experts per layer: those whose extra replica removes the most overload
_LIGHT_EXPERTS = 8  # ... and those whose extra replica is lightest (to replace a heavy one on an overloaded GPU)
_SWAP_GPUS = 16  # overloaded GPUs tried for swaps per round, heaviest first
_SWAP_PARTNERS = 16  # lightest GPUs tried as their partners
_CHAIN_GPUS = 16  # lightest GPUs whose slots may take a new replica while their expert moves on
_LANDING_SLOTS = 16  # slots (of an expert with spare replicas) where that expert may land, cheapest first
_PER_ROUND = 4  # changes applied per layer and round, at most
_MIN_GAIN = 1e-12  # relative overload a change must remove
_PATIENCE = 3  # rounds without less overload after which a layer counts as stuck
_SWAP, _REPOINT, _CHAIN = 0, 1, 2
_PRUNE_SHORTLIST = 16  # prune: slot-to-origin-expert candidates per layer and round whose max load is computed exactly


def repair(
    load_LE: FloatArray,
    placement_LGS: IntArray,
    *,
    limit_L: FloatArray,
    origin: Origin,
    layer_budget_L: IntArray | None = None,
    max_rounds: int = 1_000,
    deadline: float | None = None,
    aim: float = _AIM,
    per_round: int = _PER_ROUND,
) -> tuple[IntArray, IntArray, BoolArray, BoolArray]:
    """Return (placement, copies spent per layer against `origin`, reached per layer, cut per layer: stopped by
    `max_rounds` or the deadline while it could still go on).

    `limit_L`: the largest GPU load allowed per layer. `layer_budget_L`: copies each layer may spend (None:
    unbounded). `deadline`: a `time.process_time()` value after which no new round starts. `aim`: the fraction of
    the limit above which load counts as overload (a lower aim takes another path, at more copies). `per_round`:
    changes applied per layer and round, at most (another path too).
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
    least_over = np.full(num_layers, np.inf)  # the least overload each layer's path has seen
    idle = np.zeros(num_layers, dtype=np.int64)  # rounds since it last dropped
    for _ in range(max_rounds):
        rows = np.flatnonzero(active)
        if not len(rows) or (deadline is not None and time.process_time() >= deadline):
            break
        left = None if layer_budget_L is None else layer_budget_L[rows] - spent[rows]
        found = _round(load_LE, placement, counts, holds, rows, limit_L[rows] * aim, origin, left, spent, per_round)
        active[rows[~found]] = False
        loads_n = _gpu_loads(load_LE, placement, counts, rows)
        peak_n = loads_n.max(axis=1)
        # changes are valued one by one: if together they stop removing overload, the layer is stuck
        over_n = np.maximum(loads_n - (limit_L[rows] * aim)[:, _NEW], 0.0).sum(axis=1)
        dropped = over_n < least_over[rows] * (1 - 1e-12)
        least_over[rows] = np.minimum(least_over[rows], over_n)
        idle[rows] = np.where(dropped, 0, idle[rows] + 1)
        active[rows[idle[rows] >= _PATIENCE]] = False
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
    per_round: int,
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

    x_rem = np.take_along_axis(rem_E, P.reshape(n, -1), axis=1).reshape(P.shape)  # [n, G, S]
    o = origin.holds_LEG
    gpus = np.arange(num_gpus)
    refund_GS = ~o[rows[:, _NEW, _NEW], P, gpus[_NEW, :, _NEW]]  # the slot's expert was itself a copy here

    # --- re-points: every slot (g, t), new expert y from a short list ---------------------------------------------
    k_rel = min(_RELIEF_EXPERTS, num_experts)
    k_light = min(_LIGHT_EXPERTS, num_experts)
    relief = np.argpartition(add_E, k_rel - 1, axis=1)[:, :k_rel]
    light = np.argpartition(w / (c + 1), k_light - 1, axis=1)[:, :k_light]
    ys = np.concatenate([relief, light], axis=1)  # [n, K]
    y_share = np.take_along_axis(w / (c + 1), ys, axis=1)  # [n, K]
    y_add = np.take_along_axis(add_E, ys, axis=1)
    self_g = over(gl[:, :, _NEW, _NEW] - SH[..., _NEW] + y_share[:, _NEW, _NEW, :], aim_[:, :, _NEW, _NEW])
    y_gain = self_g - base[:, :, _NEW, _NEW] + y_add[:, _NEW, _NEW, :]  # [n, G, S, K]: slot (g, t) takes y
    rk = rows[:, _NEW, _NEW]
    y_on_g = holds[rk, ys[:, _NEW, :], gpus[_NEW, :, _NEW]]  # [n, G, K]
    y_cost = (~o[rk, ys[:, _NEW, :], gpus[_NEW, :, _NEW]]).astype(np.int64)[:, :, _NEW, :] - refund_GS[..., _NEW]
    takes_y = ~y_on_g[:, :, _NEW, :] & (P[..., _NEW] != ys[:, _NEW, _NEW, :])
    rp = _best(
        -((x_rem - rem_GS)[..., _NEW] + y_gain) / scale[:, _NEW, _NEW, _NEW],
        y_cost,
        removable[..., _NEW] & takes_y,
        left,
    )  # best per GPU, over (t, y)
    rp_t, rp_k = np.divmod(rp.pick, ys.shape[1])
    rp_y = np.take_along_axis(ys, rp_k, axis=1)

    # --- chains: a light GPU's slot takes y, its expert x moves to a slot (k, u) whose expert z has spare replicas ---
    order = np.argsort(-gl, axis=1, kind="stable")
    k_ch = min(_CHAIN_GPUS, num_gpus)
    m_land = min(_LANDING_SLOTS, num_gpus * num_slots)
    hs = order[:, num_gpus - k_ch :]  # the lightest GPUs
    # landing slots: removable z, ranked by the overload that adding a mean slot load there would cost
    mean_slot = (gl.mean(axis=1) / num_slots)[:, _NEW, _NEW]
    land_cost = over(gl[:, :, _NEW] - SH + mean_slot, aim_[:, :, _NEW]) - base[:, :, _NEW] + x_rem - rem_GS
    land_flat = np.where(removable, land_cost, np.inf).reshape(n, -1)
    land = np.argpartition(land_flat, m_land - 1, axis=1)[:, :m_land]  # [n, M]
    land_g, land_u = np.divmod(land, num_slots)
    land_z_pen = np.take_along_axis((x_rem - rem_GS).reshape(n, -1), land, axis=1)  # z's other GPUs
    land_sh = np.take_along_axis(SH.reshape(n, -1), land, axis=1)
    land_ok = np.take_along_axis(removable.reshape(n, -1), land, axis=1)
    land_gl = gl[r[:, _NEW], land_g]
    xh = P[r[:, _NEW], hs]  # [n, H, S]
    sh_x = SH[r[:, _NEW], hs]
    k_term = over(land_gl[:, _NEW, _NEW, :] - land_sh[:, _NEW, _NEW, :] + sh_x[..., _NEW], aim[:, _NEW, _NEW, _NEW])
    k_term = k_term - over(land_gl, aim_)[:, _NEW, _NEW, :] + land_z_pen[:, _NEW, _NEW, :]  # [n, H, S, M]
    ch_gain = y_gain[r[:, _NEW], hs][..., _NEW] + k_term[:, :, :, _NEW, :]  # [n, H, S, K, M]
    x_on_k = holds[rows[:, _NEW, _NEW, _NEW], xh[..., _NEW], land_g[:, _NEW, _NEW, :]]  # [n, H, S, M]
    ch_ok = takes_y[r[:, _NEW], hs][..., _NEW] & (land_ok[:, _NEW, _NEW, :] & ~x_on_k)[:, :, :, _NEW, :]
    ch_ok &= (land_g[:, _NEW, :] != hs[..., _NEW])[:, :, _NEW, _NEW, :]
    z_land = np.take_along_axis(P.reshape(n, -1), land, axis=1)
    ch_ok &= z_land[:, _NEW, _NEW, _NEW, :] != ys[:, _NEW, _NEW, :, _NEW]
    x_cost = (~o[rows[:, _NEW, _NEW, _NEW], xh[..., _NEW], land_g[:, _NEW, _NEW, :]]).astype(np.int64)
    z_refund = np.take_along_axis(refund_GS.reshape(n, -1), land, axis=1)
    ch_cost = y_cost[r[:, _NEW], hs][..., _NEW] + (x_cost - z_refund[:, _NEW, _NEW, :])[:, :, :, _NEW, :]
    ch = _best(-ch_gain / scale[:, _NEW, _NEW, _NEW, _NEW], ch_cost, ch_ok, left)  # best per light GPU
    ch_t, ch_rest = np.divmod(ch.pick, ys.shape[1] * m_land)
    ch_k, ch_m = np.divmod(ch_rest, m_land)
    ch_y = np.take_along_axis(ys, ch_k, axis=1)

    # --- swaps: the heaviest GPUs with the lightest ------------------------------------------------------------------
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
    xs = P[r[:, _NEW], heavy]  # [n, h, S]
    zm = P[r[:, _NEW], lightg]  # [n, m, S]
    x_on_m = holds[rows[:, _NEW, _NEW, _NEW], xs[..., _NEW], lightg[:, _NEW, _NEW, :]]  # [n, h, S, m]
    z_on_h = holds[rows[:, _NEW, _NEW, _NEW], zm[:, _NEW], heavy[:, :, _NEW, _NEW]]  # [n, h, m, S]
    sw_cost = (
        (~o[rows[:, _NEW, _NEW, _NEW], xs[..., _NEW], lightg[:, _NEW, _NEW, :]]).astype(np.int64)[..., _NEW]
        + (~o[rows[:, _NEW, _NEW, _NEW], zm[:, _NEW], heavy[:, :, _NEW, _NEW]])[:, :, _NEW]
        - refund_GS[r[:, _NEW], heavy][..., _NEW, _NEW]
        - refund_GS[r[:, _NEW], lightg][:, _NEW, _NEW]
    )
    sw = _best(-sw_delta / scale[:, _NEW, _NEW, _NEW, _NEW], sw_cost, ~x_on_m[..., _NEW] & ~z_on_h[:, :, _NEW], left)
    sw_s, sw_j, sw_u = np.unravel_index(sw.pick, (num_slots, m, num_slots))

    # --- one pool per layer: kind, slot a takes an expert, slot b, the experts whose count changes ---------------
    none = np.full((n, k_sw), -1)
    all_g = np.broadcast_to(gpus, (n, num_gpus))
    rp_x = np.take_along_axis(P, rp_t[..., _NEW], axis=2)[..., 0]
    ch_g, ch_u = np.take_along_axis(land_g, ch_m, 1), np.take_along_axis(land_u, ch_m, 1)
    pool = _Pool(
        score=np.concatenate([rp.score, ch.score, sw.score], axis=1),
        cost=np.concatenate([rp.cost, ch.cost, sw.cost], axis=1),
        kind=np.concatenate(
            [np.full((n, num_gpus), _REPOINT), np.full((n, k_ch), _CHAIN), np.full((n, k_sw), _SWAP)], 1
        ),
        gpu_a=np.concatenate([all_g, hs, heavy], axis=1),
        slot_a=np.concatenate([rp_t, ch_t, sw_s], axis=1),
        gpu_b=np.concatenate([all_g, ch_g, np.take_along_axis(lightg, sw_j, axis=1)], axis=1),
        slot_b=np.concatenate([rp_t, ch_u, sw_u], axis=1),
        new=np.concatenate([rp_y, ch_y, none], axis=1),
        gains=np.concatenate([rp_y, ch_y, none], axis=1),
        loses=np.concatenate([rp_x, np.take_along_axis(z_land, ch_m, axis=1), none], axis=1),
    )
    found: BoolArray = np.asarray(np.isfinite(pool.score).any(axis=1))
    take = _choose(pool, holds, rows, left, per_round)
    _apply(placement, counts, holds, rows, pool, take)
    spent[rows] += np.where(take, pool.cost, 0).sum(axis=1)
    return found


@dataclass(frozen=True)
class _Best:
    """Per row and group of candidates: the best score per copy, its copies, and its flat index in the group."""

    score: FloatArray
    cost: IntArray
    pick: IntArray


def _best(gain: FloatArray, cost: IntArray, ok: BoolArray, left: IntArray | None) -> _Best:
    """The best candidate per [n, A] over the trailing axes of `gain` (overload removed, relative to the mean)."""
    n, groups = gain.shape[:2]
    cost = np.broadcast_to(cost, gain.shape)
    ok = ok & (gain > _MIN_GAIN)
    if left is not None:
        ok &= cost <= left.reshape((n,) + (1,) * (cost.ndim - 1))
    score = np.where(ok, gain / np.maximum(cost, 0.5), -np.inf).reshape(n, groups, -1)
    pick = np.argmax(score, axis=2)
    best = np.take_along_axis(score, pick[..., _NEW], axis=2)[..., 0]
    picked = np.take_along_axis(cost.reshape(n, groups, -1), pick[..., _NEW], axis=2)[..., 0]
    return _Best(best, picked.astype(np.int64), pick)


@dataclass(frozen=True)
class _Pool:
    """Candidate changes per layer [n, C]: slot a takes expert `new` (swap: slot b's expert), slot b takes slot a's
    expert (swap and chain); `gains` / `loses`: the expert whose replica count goes up / down (-1: none)."""

    score: FloatArray
    cost: IntArray
    kind: IntArray
    gpu_a: IntArray
    slot_a: IntArray
    gpu_b: IntArray
    slot_b: IntArray
    new: IntArray
    gains: IntArray
    loses: IntArray


def _choose(pool: _Pool, holds: BoolArray, rows: IntArray, left: IntArray | None, per_round: int) -> BoolArray:
    """Best score first, skipping a change that touches a GPU an earlier chosen one touched (its own GPUs and every
    GPU holding an expert whose count it changes), at most `per_round` per layer, within the budget."""
    n, _ = pool.score.shape
    r = np.arange(n)
    gpus = np.arange(holds.shape[2])
    order = np.argsort(-pool.score, axis=1, kind="stable")[:, : 4 * per_round]
    used = np.zeros((n, len(gpus)), dtype=bool)
    take = np.zeros(pool.score.shape, dtype=bool)
    taken = np.zeros(n, dtype=np.int64)
    budget = None if left is None else left.copy()
    for k in range(order.shape[1]):
        col = order[:, k]
        up, down = pool.gains[r, col], pool.loses[r, col]
        touch = (gpus == pool.gpu_a[r, col][:, _NEW]) | (gpus == pool.gpu_b[r, col][:, _NEW])
        touch |= holds[rows, np.maximum(up, 0)] & (up >= 0)[:, _NEW]
        touch |= holds[rows, np.maximum(down, 0)] & (down >= 0)[:, _NEW]
        ok = np.isfinite(pool.score[r, col]) & ~(touch & used).any(axis=1) & (taken < per_round)
        if budget is not None:
            ok &= pool.cost[r, col] <= budget
            budget -= np.where(ok, pool.cost[r, col], 0)
        used |= touch & ok[:, _NEW]
        take[r[ok], col[ok]] = True
        taken += ok
    return take


def _apply(
    placement: IntArray, counts: IntArray, holds: BoolArray, rows: IntArray, pool: _Pool, take: BoolArray
) -> None:
    """Apply the chosen changes in place (they touch distinct GPUs, so their writes never collide)."""
    li, col = np.nonzero(take)
    lay = rows[li]
    kind = pool.kind[li, col]
    ga, sa, gb, sb = pool.gpu_a[li, col], pool.slot_a[li, col], pool.gpu_b[li, col], pool.slot_b[li, col]
    new = pool.new[li, col]
    xa, zb = placement[lay, ga, sa], placement[lay, gb, sb]
    swap, repoint, chain = kind == _SWAP, kind == _REPOINT, kind == _CHAIN
    into_a = np.where(swap, zb, new)  # what slot a holds afterwards
    placement[lay, ga, sa] = into_a
    moved = swap | chain  # slot b takes a's old expert
    placement[lay[moved], gb[moved], sb[moved]] = xa[moved]
    holds[lay, xa, ga] = False
    holds[lay[moved], zb[moved], gb[moved]] = False
    holds[lay, into_a, ga] = True
    holds[lay[moved], xa[moved], gb[moved]] = True
    np.add.at(counts, (lay[repoint], xa[repoint]), -1)
    np.add.at(counts, (lay[chain], zb[chain]), -1)
    grown = repoint | chain
    np.add.at(counts, (lay[grown], new[grown]), 1)


def prune(load_LE: FloatArray, placement_LGS: IntArray, origin_LGS: IntArray, *, limit_L: FloatArray) -> IntArray:
    """Undo copies the limit does not need: per layer and round, one copy goes back while the max GPU load stays
    within `limit_L` (1e-12 relative margin for rounding), until none can.

    Two ways back, counted against `origin_LGS`: a copied slot takes an expert its GPU held in the origin and no
    longer holds (one copy fewer; the slot's expert keeps another replica), or two copied slots swap back (each
    expert returns to a GPU that held it in the origin: two copies fewer, counts unchanged). Two copies first, then
    the lowest max load. The repair applies several changes per round and keeps those a later one made unneeded.
    """
    placement = placement_LGS.copy()
    held0 = membership(origin_LGS, load_LE.shape[1])
    active = np.ones(len(placement), dtype=bool)
    while active.any():
        rows = np.flatnonzero(active)
        active[rows[~_prune_round(load_LE, placement, origin_LGS, held0, rows, limit_L[rows])]] = False
    return placement


def _prune_round(
    load_LE: FloatArray, placement: IntArray, origin_LGS: IntArray, held0: BoolArray, rows: IntArray, limit: FloatArray
) -> BoolArray:
    """One undo per layer of `rows`, in place; returns which of them found one."""
    n, (num_gpus, num_slots) = len(rows), placement.shape[1:]
    num_experts = load_LE.shape[1]
    r, gpus = np.arange(n), np.arange(num_gpus)
    P, w = placement[rows], load_LE[rows]
    c = replica_counts(P, num_experts).astype(np.float64)
    SH = np.take_along_axis(w / np.maximum(c, 1), P.reshape(n, -1), axis=1).reshape(P.shape)
    gl = SH.sum(axis=2)
    holds = membership(P, num_experts)
    copy_GS = ~held0[rows[:, _NEW, _NEW], P, gpus[_NEW, :, _NEW]]
    top = np.argsort(-gl, axis=1, kind="stable")[:, : min(3, num_gpus)]  # the rest's max load, from the heaviest 3
    top_gl = np.take_along_axis(gl, top, axis=1)[:, _NEW, _NEW, _NEW, :]
    top = top[:, _NEW, _NEW, _NEW, :]
    lim = limit[:, _NEW, _NEW, _NEW] * (1 - 1e-12)
    scale = np.where((lim > 0) & np.isfinite(lim), lim, np.maximum(gl.max(axis=1), 1e-300)[:, _NEW, _NEW, _NEW])
    g4 = gpus[_NEW, :, _NEW, _NEW]

    # back: slot (g, t) of expert y takes x, the expert of origin slot (g, s): [n, G, S (t), S (s)]
    x = origin_LGS[rows][:, :, _NEW, :]
    c_x = np.take_along_axis(c, x.reshape(n, -1), axis=1).reshape(x.shape)
    w_x = np.take_along_axis(w, x.reshape(n, -1), axis=1).reshape(x.shape)
    c_y = np.take_along_axis(c, P.reshape(n, -1), axis=1).reshape(P.shape)
    ok_a = (copy_GS & (c_y >= 2))[..., _NEW] & ~holds[r[:, _NEW, _NEW, _NEW], x, g4]
    new_g = gl[:, :, _NEW, _NEW] - SH[..., _NEW] + w_x / (c_x + 1)
    # the exact max load of the _PRUNE_SHORTLIST candidates per layer whose own GPU ends lightest
    k = min(_PRUNE_SHORTLIST, new_g[0].size)
    short = np.argsort(np.where(ok_a & (new_g <= lim), new_g, np.inf).reshape(n, -1), axis=1, kind="stable")[:, :k]
    sg, st_, ss = np.unravel_index(short, (num_gpus, num_slots, num_slots))
    sy, sx = P[r[:, _NEW], sg, st_], origin_LGS[rows[:, _NEW], sg, ss]
    cy, cx = c[r[:, _NEW], sy], c[r[:, _NEW], sx]
    wy, wx = w[r[:, _NEW], sy], w[r[:, _NEW], sx]
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(cy >= 2, wy / (cy - 1) - wy / cy, np.inf)
    down = wx / cx - wx / (cx + 1)
    loads = gl[:, _NEW, :] + np.where(holds[r[:, _NEW], sy], up[..., _NEW], 0.0)
    loads -= np.where(holds[r[:, _NEW], sx], down[..., _NEW], 0.0)
    loads[r[:, _NEW], np.arange(k), sg] = np.take_along_axis(new_g.reshape(n, -1), short, axis=1)
    peak_short = loads.max(axis=2)
    ok_short = np.take_along_axis(ok_a.reshape(n, -1), short, axis=1) & (peak_short <= lim[:, 0, 0])
    score_short = np.where(ok_short, 1.0 - peak_short / scale[:, 0, 0], -np.inf)
    score_a = np.full(new_g.shape, -np.inf).reshape(n, -1)
    np.put_along_axis(score_a, short, score_short, axis=1)

    # swap back: slot (g, t) holds z, which h held in the origin and no longer holds; h's slot s holds x, a copy,
    # which g held in the origin and no longer holds
    home = held0[rows] & ~holds  # [n, E, G]: e is missing from a GPU that held it
    z_home = home[r[:, _NEW, _NEW], P]  # [n, G, S, G]
    h = np.argmax(z_home, axis=3)
    xs = P[r[:, _NEW, _NEW], h]  # [n, G, S (t), S (s)]: the experts of h's slots
    ok_b = (copy_GS & z_home.any(axis=3) & (h != gpus[_NEW, :, _NEW]))[..., _NEW]
    ok_b = ok_b & ~held0[rows[:, _NEW, _NEW, _NEW], xs, h[..., _NEW]] & home[r[:, _NEW, _NEW, _NEW], xs, g4]
    sh_x = SH[r[:, _NEW, _NEW, _NEW], h[..., _NEW], np.arange(num_slots)]
    new_gb = gl[:, :, _NEW, _NEW] - SH[..., _NEW] + sh_x
    new_h = gl[r[:, _NEW, _NEW], h][..., _NEW] - sh_x + SH[..., _NEW]
    rest_b = np.where((top != g4[..., _NEW]) & (top != h[..., _NEW, _NEW]), top_gl, -np.inf).max(axis=-1)
    peak_b = np.maximum(np.maximum(new_gb, new_h), rest_b)
    score_b = np.where(ok_b & (peak_b <= lim), 2.0 - peak_b / scale, -np.inf)

    scores = np.concatenate([score_a.reshape(n, -1), score_b.reshape(n, -1)], axis=1)
    best = np.argmax(scores, axis=1)
    found: BoolArray = np.isfinite(scores[r, best])
    size = num_gpus * num_slots * num_slots
    for i in np.flatnonzero(found):
        layer, (kind, at) = rows[i], divmod(int(best[i]), size)
        g, t, s = np.unravel_index(at, (num_gpus, num_slots, num_slots))
        if kind == 0:
            placement[layer, g, t] = origin_LGS[layer, g, s]
        else:
            k = h[i, g, t]
            placement[layer, g, t], placement[layer, k, s] = placement[layer, k, s], placement[layer, g, t]
    return found
