"""Relabel the GPUs of a placement so that it shares as many experts as it can with a reference placement.

A from-scratch solution says which experts share a GPU, not which physical GPU that is: any permutation of its GPUs
balances the same. Matching each new GPU to the reference GPU with which it shares the most experts (greedy, mutual
best pairs first) keeps those experts where they already are, so far fewer copies are needed.
"""

from __future__ import annotations

import numpy as np

from k2_eplb.metrics import IntArray

_MUTUAL_ROUNDS = 8  # then the rest in order: the later rounds pair few GPUs each and cost as much


def align_gpus(reference_LGS: IntArray, placement_LGS: IntArray, num_experts: int) -> IntArray:
    """`placement_LGS` with its GPUs permuted per layer towards the largest overlap with `reference_LGS`."""
    num_layers, num_gpus, _ = placement_LGS.shape
    layer = np.arange(num_layers)
    overlap = _overlap(reference_LGS, placement_LGS, num_experts)  # [L, new GPU, reference GPU]
    target = np.full((num_layers, num_gpus), -1, dtype=np.int64)
    taken = np.zeros((num_layers, num_gpus), dtype=bool)
    # a few rounds of mutual best pairs (each the best free match of the other), all layers at once
    for _ in range(_MUTUAL_ROUNDS):
        free = (target < 0)[:, :, None] & ~taken[:, None, :]
        masked = np.where(free, overlap, -1)
        best_col = masked.argmax(axis=2)
        best_row = masked.argmax(axis=1)
        value = np.take_along_axis(masked, best_col[:, :, None], axis=2)[..., 0]
        mutual = (value > 0) & (best_row[layer[:, None], best_col] == np.arange(num_gpus)[None, :])
        if not mutual.any():
            break
        rows_l, rows_g = np.nonzero(mutual)
        target[rows_l, rows_g] = best_col[rows_l, rows_g]
        taken[rows_l, best_col[rows_l, rows_g]] = True
    # then the others in order of their best overlap, each taking its best free reference GPU
    order = np.argsort(-np.where((target < 0), overlap.max(axis=2), -1), axis=1, kind="stable")
    for rank in range(int((target < 0).sum(axis=1).max(initial=0))):
        row = order[:, rank]
        open_ = target[layer, row] < 0
        pick = np.where(taken, -1, overlap[layer, row]).argmax(axis=1)
        target[layer[open_], row[open_]] = pick[open_]
        taken[layer[open_], pick[open_]] = True
    aligned = np.empty_like(placement_LGS)
    aligned[layer[:, None], target] = placement_LGS
    return aligned


def _overlap(reference_LGS: IntArray, placement_LGS: IntArray, num_experts: int) -> IntArray:
    """overlap[l, g, h]: experts that new GPU g and reference GPU h both hold in layer l."""
    num_layers, num_gpus, _ = reference_LGS.shape
    holds = np.zeros((num_layers, num_experts, num_gpus), dtype=np.int32)  # reference: expert e on GPU h
    holds[np.arange(num_layers)[:, None, None], reference_LGS, np.arange(num_gpus)[None, :, None]] = 1
    shared: IntArray = holds[np.arange(num_layers)[:, None, None], placement_LGS].sum(axis=2, dtype=np.int64)
    return shared
