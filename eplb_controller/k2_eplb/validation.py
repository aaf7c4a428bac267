"""Input checks shared by the solver and the baseline; each failure is a ValueError naming the argument."""

from __future__ import annotations

import numbers

import numpy as np
import numpy.typing as npt

from k2_eplb.metrics import FloatArray, IntArray, replica_counts


def check_load(load: npt.ArrayLike) -> FloatArray:
    """`load` as a float64 [layers, experts] array of finite, non-negative token counts."""
    try:
        array = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"load: not a numeric array ({error})") from None
    if array.ndim != 2:
        raise ValueError(f"load: expected shape [layers, experts], got {array.ndim} dimension(s) {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"load: needs at least one layer and one expert, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("load: contains NaN or infinite values")
    if (array < 0).any():
        raise ValueError("load: contains negative values")
    return array


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def check_shape(num_experts: int, num_gpus: object, slots_per_gpu: object) -> tuple[int, int]:
    """(num_gpus, slots_per_gpu) after checking that every expert fits with distinct experts per GPU."""
    gpus = check_positive_int(num_gpus, "num_gpus")
    slots = check_positive_int(slots_per_gpu, "slots_per_gpu")
    if gpus * slots < num_experts:
        raise ValueError(
            f"num_gpus, slots_per_gpu: {gpus} GPUs x {slots} slots = {gpus * slots} slots "
            f"cannot hold {num_experts} experts"
        )
    if slots > num_experts:
        raise ValueError(
            f"slots_per_gpu: {slots} slots per GPU need {slots} distinct experts per GPU, "
            f"but there are only {num_experts} experts"
        )
    return gpus, slots


def check_max_moves(max_moves: object) -> int | None:
    if max_moves is None:
        return None
    if isinstance(max_moves, bool) or not isinstance(max_moves, numbers.Integral) or int(max_moves) < 0:
        raise ValueError(f"max_moves: expected a non-negative integer or None, got {max_moves!r}")
    return int(max_moves)


def check_gpus_per_node(gpus_per_node: object, num_gpus: int) -> int | None:
    if gpus_per_node is None:
        return None
    value = check_positive_int(gpus_per_node, "gpus_per_node")
    if num_gpus % value:
        raise ValueError(f"gpus_per_node: {value} does not divide num_gpus {num_gpus}")
    return value


def check_placement(placement: npt.ArrayLike, num_layers: int, num_experts: int, shape: tuple[int, int]) -> IntArray:
    """`current` as an int64 [layers, gpus, slots] array that holds every expert, each at most once per GPU."""
    name = "current"
    array = np.asarray(placement)
    expected = (num_layers, *shape)
    if array.shape != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {array.shape}")
    integral = array.dtype.kind in "iu" or (
        array.dtype.kind == "f" and bool(np.isfinite(array).all()) and bool((array == np.round(array)).all())
    )
    if not integral:
        raise ValueError(f"{name}: expected integer expert ids, got dtype {array.dtype}")
    ids = array.astype(np.int64)
    if ids.min() < 0 or ids.max() >= num_experts:
        raise ValueError(f"{name}: expert ids must lie in [0, {num_experts}), got [{ids.min()}, {ids.max()}]")
    counts = replica_counts(ids, num_experts)
    missing = np.argwhere(counts == 0)
    if len(missing):
        layer, expert = missing[0]
        raise ValueError(f"{name}: layer {layer} has no replica of expert {expert}")
    ordered = np.sort(ids, axis=2)
    repeated = np.argwhere((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2))
    if len(repeated):
        layer, gpu = repeated[0]
        raise ValueError(f"{name}: GPU {gpu} of layer {layer} holds two replicas of one expert")
    return ids
