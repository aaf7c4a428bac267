"""Pure evaluation helpers for expert placements.

Shapes: L layers, E logical experts, G GPUs, S slots per GPU. A placement is an int array [L, G, S] of logical expert
ids; `load` is [L, E] tokens per logical expert. An expert's tokens are split evenly over its replicas, duplicates
on one GPU included (the published baseline may produce them).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def replica_counts(placement_LGS: IntArray, num_experts: int) -> IntArray:
    """Replicas per logical expert, [L, E]."""
    num_layers = placement_LGS.shape[0]
    flat = placement_LGS.reshape(num_layers, -1) + num_experts * np.arange(num_layers)[:, None]
    counts = np.bincount(flat.ravel(), minlength=num_layers * num_experts)
    return counts.reshape(num_layers, num_experts).astype(np.int64)


def slot_loads(load_LE: FloatArray, placement_LGS: IntArray) -> FloatArray:
    """Tokens each slot serves, [L, G, S]: its expert's load divided by that expert's replica count."""
    num_layers, num_experts = load_LE.shape
    counts_LE = replica_counts(placement_LGS, num_experts)
    share_LE = load_LE / np.maximum(counts_LE, 1)
    flat = np.take_along_axis(share_LE, placement_LGS.reshape(num_layers, -1), axis=1)
    return flat.reshape(placement_LGS.shape)


def gpu_loads(load_LE: FloatArray, placement_LGS: IntArray) -> FloatArray:
    """Tokens each GPU serves, [L, G]."""
    loads: FloatArray = slot_loads(load_LE, placement_LGS).sum(axis=2)
    return loads


def balancedness_of_gpu_loads(gpu_loads_LG: FloatArray) -> FloatArray:
    """Mean GPU load / max GPU load per layer, [L]; 1.0 for a layer without load."""
    peak = gpu_loads_LG.max(axis=1)
    mean = gpu_loads_LG.mean(axis=1)
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 1.0)


def balancedness(load_LE: FloatArray, placement_LGS: IntArray) -> FloatArray:
    """Mean GPU load / max GPU load per layer, [L] (1.0 is perfect)."""
    return balancedness_of_gpu_loads(gpu_loads(load_LE, placement_LGS))


def _membership(placement_LGS: IntArray, num_experts: int) -> npt.NDArray[np.bool_]:
    """holds[l, g, e]: GPU g holds at least one replica of expert e in layer l."""
    num_layers, num_gpus, _ = placement_LGS.shape
    holds = np.zeros((num_layers, num_gpus, num_experts), dtype=bool)
    layer = np.arange(num_layers)[:, None, None]
    gpu = np.arange(num_gpus)[None, :, None]
    holds[layer, gpu, placement_LGS] = True
    return holds


def moves_per_layer(current_LGS: IntArray, new_LGS: IntArray) -> IntArray:
    """Copies per layer, [L]: experts that `new` puts on a GPU which held no replica of them in `current`.

    Slot order inside a GPU is ignored: re-ordering experts already resident costs no copy.
    """
    if current_LGS.shape != new_LGS.shape:
        raise ValueError(f"new: shape {new_LGS.shape} differs from current {current_LGS.shape}")
    num_experts = int(max(current_LGS.max(initial=0), new_LGS.max(initial=0))) + 1
    copies = _membership(new_LGS, num_experts) & ~_membership(current_LGS, num_experts)
    per_layer: IntArray = copies.sum(axis=(1, 2)).astype(np.int64)
    return per_layer


def count_moves(current_LGS: IntArray, new_LGS: IntArray) -> int:
    """Total copies over all layers (see `moves_per_layer`)."""
    return int(moves_per_layer(current_LGS, new_LGS).sum())


def count_cross_node_moves(current_LGS: IntArray, new_LGS: IntArray, gpus_per_node: int) -> int:
    """Copies whose expert had no replica anywhere on the destination GPU's node in `current`."""
    num_layers, num_gpus, _ = current_LGS.shape
    if gpus_per_node < 1 or num_gpus % gpus_per_node:
        raise ValueError(f"gpus_per_node: {gpus_per_node} does not divide num_gpus {num_gpus}")
    num_experts = int(max(current_LGS.max(initial=0), new_LGS.max(initial=0))) + 1
    old = _membership(current_LGS, num_experts)
    copies = _membership(new_LGS, num_experts) & ~old
    num_nodes = num_gpus // gpus_per_node
    node_old = old.reshape(num_layers, num_nodes, gpus_per_node, num_experts).any(axis=2)
    node_old_per_gpu = np.repeat(node_old, gpus_per_node, axis=1)
    return int((copies & ~node_old_per_gpu).sum())
