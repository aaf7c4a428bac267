"""Local improvement of a placement, vectorised over layers, with an optional budget of copies.

Every round looks, in each layer, at the heaviest GPU g* and evaluates three kinds of change exactly:
- swap: exchange a slot of g* with a slot of another GPU (two copies, unless an expert returns to a GPU it came from);
- shed: re-point a slot of g* from an expert with >= 2 replicas to another expert (one copy); the other replicas of the
  old expert get heavier, the new expert's replicas lighter;
- replicate: re-point a slot of another GPU to an expert of g* (one copy), which lightens every replica of it.
A change is accepted only if it lowers g* without lifting any GPU to the old maximum, so (max load, number of GPUs
at the max) decreases and the search terminates. Copies are counted against `origin` (the placement being replaced):
an expert put on a GPU that held no replica of it in `origin` costs one; putting it back refunds one.

A change's value is the layer's balancedness gained, plus half of what g* alone gains, plus (with a target level)
the load it removes above that level over all GPUs; its price is its copies (a cross-node copy weighs 1.5 when
`gpus_per_node` is given). Each layer picks its best value per copy. With per-layer budgets every layer applies its
pick each round; with only a total budget the round applies the best ratios first, within a factor of the best;
without a budget every layer applies its pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from k2_eplb.metrics import FloatArray, IntArray, replica_counts

BoolArray = npt.NDArray[np.bool_]
_NEW = np.newaxis
_SHED_PER_SLOT = 2  # lightest new experts tried per slot of g*
_REPLICATE_PER_SLOT = 4  # best replicate targets tried per expert of g*
_PARTNERS = 16  # GPUs tried with g*: this many lightest, plus this many spread over the rest
_CROSS_NODE_WEIGHT = 0.5  # extra weight of a cross-node copy when ranking changes
_RATIO_WINDOW = 0.3  # with a budget, apply changes whose gain per copy is >= this times the round's best
_MIN_PROGRESS = 1e-9  # value of a change that only removes a GPU from the tie at the max
_LOCAL_GAIN_WEIGHT = 0.5  # weight of what g* alone gains in a change's value


@dataclass(frozen=True)
class Origin:
    """What copies are counted against: membership of the placement being replaced, per GPU and per node."""

    holds_LEG: BoolArray
    node_holds_LEG: BoolArray | None

    @classmethod
    def of(cls, placement_LGS: IntArray, num_experts: int, gpus_per_node: int | None) -> Origin:
        holds = membership(placement_LGS, num_experts)
        if gpus_per_node is None:
            return cls(holds, None)
        num_layers, _, num_gpus = holds.shape
        by_node = holds.reshape(num_layers, num_experts, num_gpus // gpus_per_node, gpus_per_node).any(axis=3)
        return cls(holds, np.repeat(by_node, gpus_per_node, axis=2))

    def layers(self, rows: IntArray) -> Origin:
        """The same origin restricted to the layers `rows`."""
        node = None if self.node_holds_LEG is None else self.node_holds_LEG[rows]
        return Origin(self.holds_LEG[rows], node)


def membership(placement_LGS: IntArray, num_experts: int) -> BoolArray:
    """holds[l, e, g]: GPU g holds expert e in layer l."""
    num_layers, num_gpus, _ = placement_LGS.shape
    holds = np.zeros((num_layers, num_experts, num_gpus), dtype=bool)
    holds[np.arange(num_layers)[:, _NEW, _NEW], placement_LGS, np.arange(num_gpus)[_NEW, :, _NEW]] = True
    return holds


def improve(
    load_LE: FloatArray,
    placement_LGS: IntArray,
    *,
    origin: Origin | None = None,
    budget: int | None = None,
    layer_budget_L: IntArray | None = None,
    target_L: FloatArray | None = None,
    goal_L: FloatArray | None = None,
    max_rounds: int = 10_000,
    partners: int = _PARTNERS,
) -> tuple[IntArray, IntArray]:
    """Return (improved placement, copies spent per layer against `origin`).

    `budget` bounds the total copies (None: unbounded); `layer_budget_L` bounds each layer's copies, and then every
    layer applies its best affordable change each round (parallel spending) instead of the ranked, windowed choice.
    With `target_L` (a GPU load level per layer, the mean in practice), a change is also valued by the load it removes
    above that level over all GPUs, so copies go to deep cuts (which leave slack for the next drift) and to extra
    replicas of hot experts (which lighten many GPUs at once) rather than to shallow cuts of the heaviest GPU.
    With `goal_L` (a balancedness per layer), a layer stops as soon as it reaches its goal. Each layer's path does
    not depend on the goal (with `layer_budget_L` and no total `budget`), and its balancedness never drops along it.
    `partners`: GPUs tried with the heaviest each round, this many lightest plus this many spread over the rest.
    """
    placement = placement_LGS.copy()
    num_layers, num_gpus, _ = placement.shape
    num_experts = load_LE.shape[1]
    spent_L = np.zeros(num_layers, dtype=np.int64)
    if num_gpus < 2:
        return placement, spent_L
    counts = replica_counts(placement, num_experts)
    holds = membership(placement, num_experts)
    active = np.ones(num_layers, dtype=bool)
    if goal_L is not None:
        active = _layer_balance(load_LE, placement, counts, np.arange(num_layers)) < goal_L
    for _ in range(max_rounds):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        remaining = None if budget is None else budget - int(spent_L.sum())
        row_left = None if remaining is None else np.full(len(rows), remaining, dtype=np.int64)
        if layer_budget_L is not None:
            own = layer_budget_L[rows] - spent_L[rows]
            row_left = own if row_left is None else np.minimum(row_left, own)
        target = None if target_L is None else target_L[rows]
        best = _best_changes(load_LE, placement, counts, holds, rows, origin, row_left, target, partners)
        found = np.isfinite(best.score)
        active[rows[~found]] = False
        if not found.any():
            break
        take = found.copy()
        if remaining is not None and layer_budget_L is None:
            take = _within_budget(best.score, best.cost, found, remaining)
        _apply(placement, counts, holds, rows[take], _select(best, take))
        spent_L[rows[take]] += best.cost[take]
        if goal_L is not None:
            moved = rows[take]
            active[moved] = _layer_balance(load_LE, placement, counts, moved) < goal_L[moved]
    return placement, spent_L


def _layer_balance(load_LE: FloatArray, placement: IntArray, counts: IntArray, rows: IntArray) -> FloatArray:
    """Balancedness of the layers `rows` (mean / max GPU load; 1.0 without load)."""
    share = load_LE[rows] / np.maximum(counts[rows], 1)
    flat = placement[rows].reshape(len(rows), -1)
    loads = np.take_along_axis(share, flat, axis=1).reshape(placement[rows].shape).sum(axis=2)
    peak = loads.max(axis=1)
    result: FloatArray = np.where(peak > 0, loads.mean(axis=1) / np.where(peak > 0, peak, 1.0), 1.0)
    return result


def allocate_budget(gpu_loads_LG: FloatArray, budget: int, copies_per_fix: float = 1.5) -> IntArray:
    """Split `budget` over layers so that all layers aim at one common balancedness B*: layer l needs about
    `copies_per_fix` copies per GPU above mean_l / B*; B* is the highest level whose needs fit, and the budget is
    shared in proportion to those needs (worst layers get the most).
    """
    mean_L1 = gpu_loads_LG.mean(axis=1, keepdims=True)
    peak_L1 = np.maximum(gpu_loads_LG.max(axis=1, keepdims=True), 1e-300)

    def need(level: float) -> IntArray:
        over: IntArray = (gpu_loads_LG * level > mean_L1 * (1 + 1e-12)).sum(axis=1)
        return over

    low, high = float((mean_L1 / peak_L1).min()), 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if need(mid).sum() * copies_per_fix <= budget:
            low = mid
        else:
            high = mid
    weights = need(high).astype(np.float64)
    if weights.sum() == 0:
        weights = np.ones_like(weights)
    share_L: IntArray = np.floor(budget * weights / weights.sum()).astype(np.int64)
    extra = budget - int(share_L.sum())
    share_L[np.argsort(-weights, kind="stable")[:extra]] += 1
    return share_L


@dataclass(frozen=True)
class _Changes:
    """One candidate change per row: kind 0 swap (g*, s) <-> (g, t); kind 1 re-point (g, t) from x to y."""

    score: FloatArray
    cost: IntArray
    kind: IntArray
    gpu_a: IntArray
    slot_a: IntArray
    gpu_b: IntArray
    slot_b: IntArray
    new_expert: IntArray


def _select(changes: _Changes, mask: BoolArray) -> _Changes:
    return _Changes(*(getattr(changes, name)[mask] for name in _Changes.__dataclass_fields__))


def _best_changes(
    load_LE: FloatArray,
    placement: IntArray,
    counts: IntArray,
    holds: BoolArray,
    rows: IntArray,
    origin: Origin | None,
    remaining: IntArray | None,
    target: FloatArray | None,
    num_partners: int,
) -> _Changes:
    n = len(rows)
    r = np.arange(n)
    num_gpus, num_slots = placement.shape[1:]
    w_nE = load_LE[rows]
    c_nE = counts[rows]
    share_nE = w_nE / c_nE
    P = placement[rows]
    SH = np.take_along_axis(share_nE, P.reshape(n, -1), axis=1).reshape(P.shape)
    gl = SH.sum(axis=2)
    order = np.argsort(-gl, axis=1, kind="stable")
    gs = order[:, 0]
    peak = gl[r, gs]
    mean = gl.mean(axis=1)
    tol = 1e-9 * peak
    at_peak = (gl >= (peak - tol)[:, _NEW]).sum(axis=1)
    # max load outside {g*, g}: the second heaviest unless g is it, then the third
    second = gl[r, order[:, 1]]
    third = gl[r, order[:, 2]] if num_gpus > 2 else np.full(n, -np.inf)
    outside_G = np.where(np.arange(num_gpus)[_NEW, :] == order[:, 1:2], third[:, _NEW], second[:, _NEW])

    def excess(loads: FloatArray) -> FloatArray:
        """Load above the target level, relative to the mean (per element)."""
        assert target is not None
        shape = (n,) + (1,) * (loads.ndim - 1)
        above: FloatArray = np.maximum(loads - target.reshape(shape), 0.0) / np.maximum(mean, 1e-300).reshape(shape)
        return above

    def value(new_peak: FloatArray, touched_peak: FloatArray) -> FloatArray:
        """Balancedness gained, plus a share of what g* alone would gain (prefers changes that cut g* deep, so a
        GPU is not revisited when the runner-up caps the layer's gain)."""
        shape = (n,) + (1,) * (new_peak.ndim - 1)
        mean_ = mean.reshape(shape)
        before = (mean / np.maximum(peak, 1e-300)).reshape(shape)
        gain = np.maximum(mean_ / np.maximum(new_peak, 1e-300) - before, 0.0)
        local = np.maximum(mean_ / np.maximum(touched_peak, 1e-300) - before, 0.0)
        total: FloatArray = gain + _LOCAL_GAIN_WEIGHT * local + _MIN_PROGRESS
        return total

    # --- swaps of a slot of g* with slot (g, t) -------------------------------------------------------------------
    # partners: the lightest GPUs (most able to take load off g*) and a spread sample of the rest
    partners = _partners(order, num_partners)  # [n, m]
    m = partners.shape[1]
    xs = P[r, gs]  # [n, S]
    a = SH[r, gs]
    Pm = P[r[:, _NEW], partners]  # [n, m, S]
    b = SH[r[:, _NEW], partners][:, _NEW]  # [n, 1, m, S]
    glm = gl[r[:, _NEW], partners]
    pair = np.maximum(
        peak[:, _NEW, _NEW, _NEW] - a[:, :, _NEW, _NEW] + b, glm[:, _NEW, :, _NEW] + a[:, :, _NEW, _NEW] - b
    )
    x_on_g = holds[rows[:, _NEW, _NEW], xs[:, :, _NEW], partners[:, _NEW, :]]  # [n, S, m]
    y_on_gs = holds[rows[:, _NEW, _NEW], Pm, gs[:, _NEW, _NEW]]  # [n, m, S]
    ok = ~x_on_g[..., _NEW] & ~y_on_gs[:, _NEW] & (pair < (peak - tol)[:, _NEW, _NEW, _NEW])
    outside_m = np.take_along_axis(outside_G, partners, axis=1)
    swap_value = value(np.maximum(pair, outside_m[:, _NEW, :, _NEW]), pair)
    if target is not None:
        d = a[:, :, _NEW, _NEW] - b  # load g* hands to g
        before_ab = excess(peak)[:, _NEW, _NEW, _NEW] + excess(glm)[:, _NEW, :, _NEW]
        swap_value = swap_value + before_ab - excess(peak[:, _NEW, _NEW, _NEW] - d) - excess(glm[:, _NEW, :, _NEW] + d)
    swap_cost = np.zeros(pair.shape, dtype=np.int64)
    swap_weight = np.zeros(pair.shape)
    if origin is not None:
        new_x = ~origin.holds_LEG[rows[:, _NEW, _NEW], xs[:, :, _NEW], partners[:, _NEW, :]]  # x copied onto g
        back_x = ~origin.holds_LEG[rows[:, _NEW], xs, gs[:, _NEW]]  # x was itself a copy on g*: refund
        new_y = ~origin.holds_LEG[rows[:, _NEW, _NEW], Pm, gs[:, _NEW, _NEW]]  # [n, m, S]
        back_y = ~origin.holds_LEG[rows[:, _NEW, _NEW], Pm, partners[:, :, _NEW]]
        swap_cost = (
            new_x[..., _NEW].astype(np.int64) + new_y[:, _NEW] - back_x[:, :, _NEW, _NEW] - back_y[:, _NEW]
        ).astype(np.int64)
        swap_weight = swap_cost.astype(np.float64)
        if origin.node_holds_LEG is not None:
            far_x = ~origin.node_holds_LEG[rows[:, _NEW, _NEW], xs[:, :, _NEW], partners[:, _NEW, :]]
            far_y = ~origin.node_holds_LEG[rows[:, _NEW, _NEW], Pm, gs[:, _NEW, _NEW]]
            swap_weight = swap_weight + _CROSS_NODE_WEIGHT * (far_x[..., _NEW].astype(np.float64) + far_y[:, _NEW])
    if remaining is not None:
        ok &= swap_cost <= remaining[:, _NEW, _NEW, _NEW]
    swap_score = np.where(ok, swap_value / np.maximum(swap_weight, 0.5), -np.inf).reshape(n, -1)
    swap_pick = np.argmax(swap_score, axis=1)
    swap_best = swap_score[r, swap_pick]

    # --- re-point candidates: shed on g*, replicate an expert of g* elsewhere ---------------------------------------
    new_share_nE = w_nE / (c_nE + 1)
    # shed: for each slot of g*, the experts whose added replica would be lightest there
    blocked = holds[rows, :, gs]  # [n, E] already on g*
    k_shed = min(_SHED_PER_SLOT, w_nE.shape[1])
    lightest = np.argpartition(np.where(blocked, np.inf, new_share_nE), k_shed - 1, axis=1)[:, :k_shed]
    shed_g = np.repeat(gs[:, _NEW], num_slots * k_shed, axis=1)
    shed_t = np.repeat(np.arange(num_slots)[_NEW, :], k_shed, axis=1).repeat(n, axis=0)
    shed_y = np.tile(lightest, (1, num_slots))
    # replicate: expert y_s of g* onto slot (g, t) of a GPU lacking it, ranked by the load it leaves on g
    y_share = new_share_nE[r[:, _NEW], xs]  # [n, S]
    land = glm[:, _NEW, :, _NEW] - b + y_share[:, :, _NEW, _NEW]  # [n, S, m, S]
    movable = np.take_along_axis(c_nE, Pm.reshape(n, -1), axis=1).reshape(Pm.shape) >= 2
    land_ok = ~x_on_g[..., _NEW] & movable[:, _NEW]
    # the best few targets for each expert of g*, so hot experts (whose extra replica lightens many GPUs) get tried
    flat = np.where(land_ok, land, np.inf).reshape(n, num_slots, -1)
    k_rep = min(_REPLICATE_PER_SLOT, flat.shape[2])
    rep_pick = np.argpartition(flat, k_rep - 1, axis=2)[:, :, :k_rep]
    rep_j, rep_t = np.divmod(rep_pick, num_slots)
    rep_s = np.broadcast_to(np.arange(num_slots)[None, :, None], rep_pick.shape)
    rep_s, rep_j, rep_t = (x.reshape(n, -1) for x in (rep_s, rep_j, rep_t))
    rep_g = partners[r[:, _NEW], rep_j]
    rep_y = xs[r[:, _NEW], rep_s]
    g_k = np.concatenate([shed_g, rep_g], axis=1)
    t_k = np.concatenate([shed_t, rep_t], axis=1)
    y_k = np.concatenate([shed_y, rep_y], axis=1)
    x_k = P[r[:, _NEW], g_k, t_k]
    rk = rows[:, _NEW]
    cx = c_nE[r[:, _NEW], x_k].astype(np.float64)
    cy = c_nE[r[:, _NEW], y_k].astype(np.float64)
    wx = w_nE[r[:, _NEW], x_k]
    wy = w_nE[r[:, _NEW], y_k]
    usable = (cx >= 2) & ~holds[rk, y_k, g_k]
    dx = np.where(cx >= 2, wx / np.maximum(cx - 1, 1) - wx / cx, 0.0)
    dy = wy / (cy + 1) - wy / cy
    new_load = gl[:, _NEW, :] + holds[rk, x_k] * dx[..., _NEW] + holds[rk, y_k] * dy[..., _NEW]
    kk = np.arange(g_k.shape[1])[_NEW, :]
    new_load[r[:, _NEW], kk, g_k] = gl[r[:, _NEW], g_k] - wx / cx + wy / (cy + 1)
    new_load = np.where(usable[..., _NEW], new_load, np.inf)
    new_peak = new_load.max(axis=2)
    new_at_peak = (new_load >= (peak - tol)[:, _NEW, _NEW]).sum(axis=2)
    usable &= (new_peak <= peak[:, _NEW]) & (new_at_peak < at_peak[:, _NEW])
    move_cost = np.zeros(g_k.shape, dtype=np.int64)
    move_weight = np.zeros(g_k.shape)
    if origin is not None:
        move_cost = (~origin.holds_LEG[rk, y_k, g_k]).astype(np.int64) - ~origin.holds_LEG[rk, x_k, g_k]
        move_weight = move_cost.astype(np.float64)
        if origin.node_holds_LEG is not None:
            move_weight = move_weight + _CROSS_NODE_WEIGHT * ~origin.node_holds_LEG[rk, y_k, g_k]
    if remaining is not None:
        usable &= move_cost <= remaining[:, _NEW]
    touched = np.maximum(new_load[r[:, _NEW], kk, gs[:, _NEW]], new_load[r[:, _NEW], kk, g_k])
    move_value = value(new_peak, touched)
    if target is not None:
        move_value = move_value + excess(gl).sum(axis=1)[:, _NEW] - excess(new_load).sum(axis=2)
    move_score = np.where(usable, move_value / np.maximum(move_weight, 0.5), -np.inf)
    move_pick = np.argmax(move_score, axis=1)
    move_best = move_score[r, move_pick]

    use_swap = swap_best >= move_best
    s_s, s_j, s_t = np.unravel_index(swap_pick, (num_slots, m, num_slots))
    s_g = partners[r, s_j]
    return _Changes(
        score=np.where(use_swap, swap_best, move_best),
        cost=np.where(use_swap, swap_cost.reshape(n, -1)[r, swap_pick], move_cost[r, move_pick]),
        kind=np.where(use_swap, 0, 1),
        gpu_a=np.where(use_swap, gs, g_k[r, move_pick]),
        slot_a=np.where(use_swap, s_s, t_k[r, move_pick]),
        gpu_b=s_g,
        slot_b=s_t,
        new_expert=y_k[r, move_pick],
    )


def _partners(order_nG: IntArray, count: int) -> IntArray:
    """GPUs tried with g*: the lightest `count`, plus `count` spread evenly over the rest (not g*)."""
    num_gpus = order_nG.shape[1]
    if num_gpus - 1 <= 2 * count:
        return order_nG[:, 1:]
    lightest = order_nG[:, num_gpus - count :]
    spread = np.linspace(1, num_gpus - count - 1, count).round().astype(np.int64)
    return np.concatenate([order_nG[:, spread], lightest], axis=1)


def _within_budget(score: FloatArray, cost: IntArray, found: BoolArray, remaining: int) -> BoolArray:
    """Changes to apply this round: free ones, then the best gain per copy while it stays near the best and fits."""
    take = found & (cost <= 0)
    paid = np.flatnonzero(found & (cost > 0))
    if not len(paid):
        return take
    ranked = paid[np.argsort(-score[paid], kind="stable")]
    fits = np.cumsum(cost[ranked]) <= remaining
    near = score[ranked] >= _RATIO_WINDOW * score[ranked[0]]
    take[ranked[fits & near]] = True
    return take


def _apply(placement: IntArray, counts: IntArray, holds: BoolArray, rows: IntArray, ch: _Changes) -> None:
    swap = ch.kind == 0
    lay, ga, sa, gb, sb = rows[swap], ch.gpu_a[swap], ch.slot_a[swap], ch.gpu_b[swap], ch.slot_b[swap]
    x = placement[lay, ga, sa]
    y = placement[lay, gb, sb]
    placement[lay, ga, sa] = y
    placement[lay, gb, sb] = x
    holds[lay, x, ga] = False
    holds[lay, y, gb] = False
    holds[lay, x, gb] = True
    holds[lay, y, ga] = True
    lay, g, t, y = rows[~swap], ch.gpu_a[~swap], ch.slot_a[~swap], ch.new_expert[~swap]
    x = placement[lay, g, t]
    placement[lay, g, t] = y
    counts[lay, x] -= 1
    counts[lay, y] += 1
    holds[lay, x, g] = False
    holds[lay, y, g] = True


def balance_pairs(load_LE: FloatArray, placement_LGS: IntArray, max_rounds: int = 64) -> IntArray:
    """From-scratch polish: pair the i-th heaviest GPU with a light one, for all i at once, and swap the two slots
    that best even out each pair (distinct experts kept). Round k pairs heaviest i with lightest (i + k) mod G/2,
    so partners vary. Replica counts do not change; a swap is kept only if it lowers the pair's larger load.
    """
    placement = placement_LGS.copy()
    num_layers, num_gpus, num_slots = placement.shape
    half = num_gpus // 2
    if half == 0:
        return placement
    num_experts = load_LE.shape[1]
    share_LE = load_LE / replica_counts(placement, num_experts)
    holds = membership(placement, num_experts)
    layer = np.arange(num_layers)[:, _NEW]
    idle_rounds = 0
    for k in range(max_rounds):
        SH = np.take_along_axis(share_LE, placement.reshape(num_layers, -1), axis=1).reshape(placement.shape)
        gl = SH.sum(axis=2)
        order = np.argsort(-gl, axis=1, kind="stable")
        heavy = order[:, :half]
        light = order[:, ::-1][:, (np.arange(half) + k) % half]
        a = SH[layer, heavy][..., _NEW]  # [L, h, S, 1]
        b = SH[layer, light][:, :, _NEW, :]  # [L, h, 1, S]
        top = gl[layer, heavy][..., _NEW, _NEW]
        new_max = np.maximum(top - a + b, gl[layer, light][..., _NEW, _NEW] + a - b)
        x = placement[layer, heavy]  # [L, h, S]
        y = placement[layer, light]
        ok = (
            ~holds[layer[..., _NEW], x, light[..., _NEW]][..., _NEW]
            & ~holds[layer[..., _NEW], y, heavy[..., _NEW]][:, :, _NEW]
        )
        ok &= new_max < top * (1 - 1e-12)
        flat = np.where(ok, new_max, np.inf).reshape(num_layers, half, -1)
        pick = np.argmin(flat, axis=2)
        hit = np.isfinite(np.take_along_axis(flat, pick[..., _NEW], axis=2)[..., 0])
        if not hit.any():
            idle_rounds += 1
            if idle_rounds >= 2:
                break
            continue
        idle_rounds = 0
        l_i, p_i = np.nonzero(hit)
        s, t = np.divmod(pick[l_i, p_i], num_slots)
        gh, gl_ = heavy[l_i, p_i], light[l_i, p_i]
        xe, ye = placement[l_i, gh, s], placement[l_i, gl_, t]
        placement[l_i, gh, s] = ye
        placement[l_i, gl_, t] = xe
        holds[l_i, xe, gh] = False
        holds[l_i, ye, gl_] = False
        holds[l_i, xe, gl_] = True
        holds[l_i, ye, gh] = True
    return placement
