"""Shared checks for the EPLB tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def assert_valid_placement(
    placement: npt.NDArray[np.int64], num_layers: int, num_experts: int, shape: tuple[int, int]
) -> None:
    """Every invariant of a solver result: shape and dtype, ids in range, every expert present, no GPU duplicates."""
    assert placement.shape == (num_layers, *shape)
    assert placement.dtype == np.int64
    assert placement.min() >= 0 and placement.max() < num_experts
    for layer in range(num_layers):
        assert set(placement[layer].ravel().tolist()) == set(range(num_experts)), f"layer {layer} misses an expert"
    ordered = np.sort(placement, axis=2)
    assert not (ordered[:, :, 1:] == ordered[:, :, :-1]).any(), "a GPU holds two replicas of one expert"


def field_managers(obj: dict[str, Any], top: str = "spec") -> set[str]:
    """Managers in `metadata.managedFields` that own any field under `top` (`spec`, `status`, `metadata`)."""
    return {
        entry["manager"]
        for entry in obj["metadata"].get("managedFields", [])
        if f"f:{top}" in entry.get("fieldsV1", {})
    }
