"""Replica counts: how many slots each logical expert gets, vectorised over layers."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from k2_eplb.metrics import FloatArray, IntArray


def greedy_replica_counts(
    load_LE: FloatArray, num_slots: int, max_replicas: int | npt.NDArray[np.int64] | None
) -> IntArray:
    """Counts [L, E] summing to `num_slots` per layer: one replica each, then every extra slot to the expert with the
    highest load per replica (ties to the lowest id) among those below `max_replicas` (a scalar or one cap per layer).

    This greedy rule minimises the largest per-replica load for the given cap.
    """
    num_layers, num_experts = load_LE.shape
    counts_LE = np.ones((num_layers, num_experts), dtype=np.int64)
    layer = np.arange(num_layers)
    cap_L1 = None if max_replicas is None else np.broadcast_to(np.asarray(max_replicas), (num_layers,))[:, None]
    if cap_L1 is not None:
        assert (cap_L1[:, 0] * num_experts >= num_slots).all(), "replica cap too small to fill every slot"
    for _ in range(num_slots - num_experts):
        share_LE = load_LE / counts_LE
        if cap_L1 is not None:
            share_LE = np.where(counts_LE < cap_L1, share_LE, -np.inf)
        counts_LE[layer, np.argmax(share_LE, axis=1)] += 1
    return counts_LE


def water_filled_counts(load_LE: FloatArray, num_slots: int, max_replicas: int | npt.NDArray[np.int64]) -> IntArray:
    """The same counts as `greedy_replica_counts` up to ties, faster: bisect the per-replica load level t with
    counts clip(ceil(load / t), 1, cap) summing to at most `num_slots`, then hand out the few slots left greedily.
    """
    num_layers, num_experts = load_LE.shape
    cap_L1 = np.broadcast_to(np.asarray(max_replicas, dtype=np.int64), (num_layers,))[:, None]
    assert (cap_L1[:, 0] * num_experts >= num_slots).all(), "replica cap too small to fill every slot"

    def counts_at(level_L1: FloatArray) -> IntArray:
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.ceil(load_LE / level_L1 - 1e-12)
        counts: IntArray = np.clip(np.nan_to_num(raw, nan=1.0, posinf=num_slots), 1, cap_L1).astype(np.int64)
        return counts

    high = np.maximum(load_LE.max(axis=1, keepdims=True), 1e-300)  # level at which everyone has one replica
    low = high / num_slots / 2
    for _ in range(60):
        mid = np.sqrt(low * high)
        too_many = counts_at(mid).sum(axis=1, keepdims=True) > num_slots
        low = np.where(too_many, mid, low)
        high = np.where(too_many, high, mid)
    counts_LE = counts_at(high)
    layer = np.arange(num_layers)
    left_L = num_slots - counts_LE.sum(axis=1)
    for _ in range(int(left_L.max(initial=0))):
        share_LE = np.where(counts_LE < cap_L1, load_LE / counts_LE, -np.inf)
        pick = np.argmax(share_LE, axis=1)
        give = left_L > 0
        counts_LE[layer[give], pick[give]] += 1
        left_L -= give
    return counts_LE
