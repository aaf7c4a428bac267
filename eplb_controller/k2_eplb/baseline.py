"""The published greedy EPLB, global policy (DeepSeek `eplb.py`, also ported by SGLang and vLLM), for comparison.

Re-implemented from its description, vectorised over layers:
1. replicate: start with one replica per expert; give each extra slot to the expert with the highest load per replica;
2. pack: take the replicas heaviest first (load / replicas) and put each on the lightest GPU that still has a free
   slot (ties to the lowest GPU index).

It ignores the current placement and may put two replicas of one expert on one GPU, as the original does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from k2_eplb.metrics import IntArray
from k2_eplb.replication import greedy_replica_counts
from k2_eplb.validation import check_load, check_positive_int


def greedy_rebalance(load: npt.ArrayLike, num_gpus: int, slots_per_gpu: int) -> IntArray:
    """Placement [layers, num_gpus, slots_per_gpu] of logical expert ids by the published greedy algorithm."""
    load_LE = check_load(load)
    num_layers, num_experts = load_LE.shape
    gpus = check_positive_int(num_gpus, "num_gpus")
    slots = check_positive_int(slots_per_gpu, "slots_per_gpu")
    if gpus * slots < num_experts:
        raise ValueError(f"num_gpus, slots_per_gpu: {gpus * slots} slots cannot hold {num_experts} experts")
    counts_LE = greedy_replica_counts(load_LE, gpus * slots, max_replicas=None)
    experts_LR, shares_LR = replicas_heaviest_first(load_LE, counts_LE)

    layer = np.arange(num_layers)
    gpu_load_LG = np.zeros((num_layers, gpus))
    fill_LG = np.zeros((num_layers, gpus), dtype=np.int64)
    placement_LGS = np.zeros((num_layers, gpus, slots), dtype=np.int64)
    for k in range(gpus * slots):
        gpu = np.argmin(np.where(fill_LG < slots, gpu_load_LG, np.inf), axis=1)
        placement_LGS[layer, gpu, fill_LG[layer, gpu]] = experts_LR[:, k]
        fill_LG[layer, gpu] += 1
        gpu_load_LG[layer, gpu] += shares_LR[:, k]
    return placement_LGS


def replicas_heaviest_first(
    load_LE: npt.NDArray[np.float64], counts_LE: IntArray
) -> tuple[IntArray, npt.NDArray[np.float64]]:
    """Each layer's replicas as (expert ids, per-replica load), [L, R], sorted by per-replica load, heaviest first.

    Ties go to the lower expert id, so an expert's replicas are adjacent.
    """
    num_layers = load_LE.shape[0]
    share_LE = load_LE / counts_LE
    order_LE = np.argsort(-share_LE, axis=1, kind="stable")
    repeats = np.take_along_axis(counts_LE, order_LE, axis=1)
    experts_LR = np.repeat(order_LE.ravel(), repeats.ravel()).reshape(num_layers, -1)
    shares_LR = np.take_along_axis(share_LE, experts_LR, axis=1)
    return experts_LR.astype(np.int64), shares_LR
