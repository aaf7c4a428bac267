"""Spend copies where they buy the most balance: pick one candidate placement per layer so that the layers' summed
balancedness reaches a need with as few copies in total as the greedy finds.

Each layer offers candidates (copies, balancedness). A candidate under the layer's floor is never picked. From each
layer's cheapest candidate at or above its floor, the greedy climbs the upper convex hull of that layer's
copies-vs-balance frontier, always on the layer whose next step buys the most balance per copy (a common price of
balance per copy across layers, the Lagrangian relaxation of the multiple-choice knapsack), until the need is met;
then, while some layer can step back to a cheaper candidate and the need stays met, the step saving the most copies
is taken (the last climb may have overshot). Pure and deterministic.
"""

from __future__ import annotations

import heapq

import numpy as np

from k2_eplb.metrics import FloatArray, IntArray


def allocate(moves_LK: IntArray, balance_LK: FloatArray, need: float, floor_L: FloatArray) -> IntArray:
    """Index of the candidate picked per layer [L] among K (copies `moves_LK`, balancedness `balance_LK`).

    The picked balancedness sums to at least `need` with few copies, and each is at least the layer's `floor_L`;
    when even the most balanced candidates fall short of `need`, each layer gets its most balanced one. Every layer
    must have a candidate at or above its floor.
    """
    num_layers = moves_LK.shape[0]
    fits_LK = balance_LK >= floor_L[:, None]
    assert fits_LK.any(axis=1).all(), "every layer needs a candidate at its floor"
    if np.where(fits_LK, balance_LK, -np.inf).max(axis=1).sum() < need:
        return np.asarray(np.argmax(np.where(fits_LK, balance_LK, -np.inf), axis=1), dtype=np.int64)
    frontiers = [_frontier(moves_LK[layer], balance_LK[layer], fits_LK[layer]) for layer in range(num_layers)]
    hulls = [_upper_hull(moves_LK[layer], balance_LK[layer], frontier) for layer, frontier in enumerate(frontiers)]
    step = [0] * num_layers
    total = float(sum(balance_LK[layer, hull[0]] for layer, hull in enumerate(hulls)))
    queue: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        hull, at = hulls[layer], step[layer]
        if at + 1 < len(hull):
            gain = balance_LK[layer, hull[at + 1]] - balance_LK[layer, hull[at]]
            cost = max(int(moves_LK[layer, hull[at + 1]] - moves_LK[layer, hull[at]]), 0)
            heapq.heappush(queue, (-gain / max(cost, 1e-9), layer))

    for layer in range(num_layers):
        push(layer)
    while total < need and queue:
        _, layer = heapq.heappop(queue)
        hull = hulls[layer]
        total += float(balance_LK[layer, hull[step[layer] + 1]] - balance_LK[layer, hull[step[layer]]])
        step[layer] += 1
        push(layer)
    pick = np.array([hulls[layer][step[layer]] for layer in range(num_layers)], dtype=np.int64)
    _step_back(moves_LK, balance_LK, frontiers, pick, need)
    return pick


def _frontier(moves_K: IntArray, balance_K: FloatArray, fits_K: np.ndarray) -> list[int]:
    """Candidates at the floor that no other beats on both counts, cheapest first (ties: the first index)."""
    order = sorted(np.flatnonzero(fits_K).tolist(), key=lambda k: (int(moves_K[k]), -float(balance_K[k]), k))
    frontier: list[int] = []
    for k in order:
        if not frontier or balance_K[k] > balance_K[frontier[-1]]:
            frontier.append(k)
    return frontier


def _upper_hull(moves_K: IntArray, balance_K: FloatArray, frontier: list[int]) -> list[int]:
    """The frontier's upper convex hull (balance per copy falls from one step to the next)."""
    hull: list[int] = []
    for k in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            left = (balance_K[b] - balance_K[a]) * (moves_K[k] - moves_K[a])
            if left > (balance_K[k] - balance_K[a]) * (moves_K[b] - moves_K[a]):
                break
            hull.pop()
        hull.append(k)
    return hull


def _step_back(
    moves_LK: IntArray, balance_LK: FloatArray, frontiers: list[list[int]], pick: IntArray, need: float
) -> None:
    """In place: while a layer can take a cheaper frontier candidate with the sum still at `need`, the one saving the
    most copies does."""
    rows = np.arange(len(pick))
    while True:
        total = float(balance_LK[rows, pick].sum())
        best: tuple[int, int, int] | None = None  # (copies saved, layer, candidate)
        for layer, frontier in enumerate(frontiers):
            now = int(pick[layer])
            for k in frontier:
                saved = int(moves_LK[layer, now] - moves_LK[layer, k])
                if saved <= 0:
                    break
                if total - balance_LK[layer, now] + balance_LK[layer, k] >= need and (best is None or saved > best[0]):
                    best = (saved, layer, k)
                    break  # the frontier is cheapest first: the first that keeps the need saves the most
        if best is None:
            return
        pick[best[1]] = best[2]
