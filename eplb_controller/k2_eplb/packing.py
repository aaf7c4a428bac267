"""Packing replicas onto GPUs: longest-processing-time first, with slot capacity and distinct experts per GPU."""

from __future__ import annotations

import numpy as np

from k2_eplb.baseline import replicas_heaviest_first
from k2_eplb.metrics import FloatArray, IntArray, slot_loads


def pack_distinct(load_BE: FloatArray, counts_BE: IntArray, num_gpus: int, slots_per_gpu: int) -> IntArray:
    """Placement [B, G, S]: replicas heaviest first, each onto the lightest GPU with a free slot that does not hold
    its expert yet (ties to the lowest GPU). Rows (layers or candidate count vectors) are packed independently.

    Requires counts <= num_gpus and sum(counts) == num_gpus * slots_per_gpu per row.
    """
    num_rows = load_BE.shape[0]
    experts_BR, shares_BR = replicas_heaviest_first(load_BE, counts_BE)
    row = np.arange(num_rows)
    gpu_load_BG = np.zeros((num_rows, num_gpus))
    fill_BG = np.zeros((num_rows, num_gpus), dtype=np.int64)
    holds_BEG = np.zeros((num_rows, load_BE.shape[1], num_gpus), dtype=bool)
    placement_BGS = np.zeros((num_rows, num_gpus, slots_per_gpu), dtype=np.int64)
    # the G heaviest replicas each open an empty GPU, in order (what the loop below would do, without ties at 0)
    first = min(num_gpus, experts_BR.shape[1])
    gpus = np.arange(first)
    placement_BGS[:, :first, 0] = experts_BR[:, :first]
    fill_BG[:, :first] = 1
    gpu_load_BG[:, :first] = shares_BR[:, :first]
    holds_BEG[row[:, None], experts_BR[:, :first], gpus[None, :]] = True
    for k in range(first, num_gpus * slots_per_gpu):
        expert = experts_BR[:, k]
        full_BG = fill_BG >= slots_per_gpu
        candidate_BG = np.where(full_BG | holds_BEG[row, expert], np.inf, gpu_load_BG)
        gpu = np.argmin(candidate_BG, axis=1)
        stuck = np.isinf(candidate_BG[row, gpu])
        if stuck.any():  # only GPUs holding this expert have room left: place a duplicate, repaired below
            gpu[stuck] = np.argmin(np.where(full_BG[stuck], np.inf, gpu_load_BG[stuck]), axis=1)
        placement_BGS[row, gpu, fill_BG[row, gpu]] = expert
        fill_BG[row, gpu] += 1
        gpu_load_BG[row, gpu] += shares_BR[:, k]
        holds_BEG[row, expert, gpu] = True
    return repair_duplicates(load_BE, placement_BGS)


def repair_duplicates(load_BE: FloatArray, placement_BGS: IntArray) -> IntArray:
    """The placement with every second replica of an expert on one GPU swapped onto a GPU lacking it.

    Counts do not change, and a GPU left with duplicates is repaired. Needs counts <= num_gpus.
    """
    placement_BGS = placement_BGS.copy()
    for b in np.flatnonzero(_has_duplicates(placement_BGS)):
        _repair_duplicates(load_BE[b], placement_BGS[b])
    return placement_BGS


def _has_duplicates(placement_BGS: IntArray) -> IntArray:
    ordered = np.sort(placement_BGS, axis=2)
    duplicated: IntArray = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=(1, 2))
    return duplicated


def _repair_duplicates(load_E: FloatArray, placement_GS: IntArray) -> None:
    """In place: swap one copy of each duplicated expert with an item of a GPU lacking it (lightest result first).

    A swap always exists: the duplicate's GPU holds at most S-1 distinct experts, so some item of any GPU lacking the
    expert is absent from it. A swap removes one duplicate and creates none.
    """
    num_slots = placement_GS.shape[1]
    shares_GS = slot_loads(load_E[None], placement_GS[None])[0]  # swaps keep counts, so shares travel with items
    gpu_load_G = shares_GS.sum(axis=1)
    same = placement_GS[:, :, None] == placement_GS[:, None, :]
    earlier = np.tril(np.ones((num_slots, num_slots), dtype=bool), k=-1)
    for gpu, slot in np.argwhere((same & earlier).any(axis=2)):  # a slot repeating an earlier slot of its GPU
        expert = placement_GS[gpu, slot]
        if np.count_nonzero(placement_GS[gpu] == expert) < 2:  # an earlier swap already moved this slot's copy away
            continue
        on_gpu = np.zeros(load_E.shape[0], dtype=bool)
        on_gpu[placement_GS[gpu]] = True
        delta_GS = shares_GS[gpu, slot] - shares_GS
        worst_GS = np.maximum(gpu_load_G[gpu] - delta_GS, gpu_load_G[:, None] + delta_GS)
        lacks_G = ~(placement_GS == expert).any(axis=1)
        worst_GS = np.where(lacks_G[:, None] & ~on_gpu[placement_GS], worst_GS, np.inf)
        other, other_slot = np.unravel_index(int(np.argmin(worst_GS)), worst_GS.shape)
        assert np.isfinite(worst_GS[other, other_slot]), "no repair swap for a duplicated expert"
        placement_GS[gpu, slot], placement_GS[other, other_slot] = placement_GS[other, other_slot], expert
        shares_GS[gpu, slot], shares_GS[other, other_slot] = shares_GS[other, other_slot], shares_GS[gpu, slot]
        gpu_load_G[gpu] -= delta_GS[other, other_slot]
        gpu_load_G[other] += delta_GS[other, other_slot]
