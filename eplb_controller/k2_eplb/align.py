"""Relabel the GPUs of a placement so that it shares as many experts as it can with a reference placement.

A from-scratch solution says which experts share a GPU, not which physical GPU that is: any permutation of its GPUs
balances the same. Matching each new GPU to the reference GPU with which it shares the most experts (greedy, mutual
best pairs first) keeps those experts where they already are, so far fewer copies are needed.
"""

from __future__ import annotations

import numpy as np

from k2_eplb.metrics import IntArray


def align_gpus(reference_LGS: IntArray, placement_LGS: IntArray, num_experts: int) -> IntArray:
    """`placement_LGS` with its GPUs permuted per layer towards the largest overlap with `reference_LGS`."""
    num_layers, num_gpus, _ = placement_LGS.shape
    layer = np.arange(num_layers)[:, None]
    overlap = _overlap(reference_LGS, placement_LGS, num_experts)  # [L, new GPU, reference GPU]
    target = np.full((num_layers, num_gpus), -1, dtype=np.int64)
    free_row = np.ones((num_layers, num_gpus), dtype=bool)
    free_col = np.ones((num_layers, num_gpus), dtype=bool)
    while True:
        masked = np.where(free_row[:, :, None] & free_col[:, None, :], overlap, -1)
        best_col = masked.argmax(axis=2)  # [L, G]: each new GPU's best free reference GPU
        best_row = masked.argmax(axis=1)  # [L, G]: each reference GPU's best free new GPU
        value = np.take_along_axis(masked, best_col[:, :, None], axis=2)[..., 0]
        mutual = free_row & (value > 0) & (best_row[layer, best_col] == np.arange(num_gpus)[None, :])
        if not mutual.any():
            break
        rows_l, rows_g = np.nonzero(mutual)
        cols = best_col[rows_l, rows_g]
        target[rows_l, rows_g] = cols
        free_row[rows_l, rows_g] = False
        free_col[rows_l, cols] = False
    # GPUs sharing nothing with any free reference GPU: paired in order
    for lay in np.flatnonzero(free_row.any(axis=1)):
        target[lay, np.flatnonzero(free_row[lay])] = np.flatnonzero(free_col[lay])
    aligned = np.empty_like(placement_LGS)
    aligned[layer, target] = placement_LGS
    return aligned


def _overlap(reference_LGS: IntArray, placement_LGS: IntArray, num_experts: int) -> IntArray:
    """overlap[l, g, h]: experts that new GPU g and reference GPU h both hold in layer l."""

    def onehot(p: IntArray) -> np.ndarray:
        num_layers, num_gpus, _ = p.shape
        holds = np.zeros((num_layers, num_gpus, num_experts), dtype=np.float32)
        holds[np.arange(num_layers)[:, None, None], np.arange(num_gpus)[None, :, None], p] = 1.0
        return holds

    shared = onehot(placement_LGS) @ onehot(reference_LGS).transpose(0, 2, 1)
    result: IntArray = np.rint(shared).astype(np.int64)
    return result
