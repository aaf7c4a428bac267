"""The placement file against the group's shape (pure): one that does not fit the model's layers and experts or the
group's ranks and slots is refused, naming each field, before rank 0 sends it to any other rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2_workers.serve.placement import ActivePlacement, GroupShape, read_placement
from tests.serve.worker_process import write_placement

SHAPE = GroupShape(num_layers=3, num_experts=8, num_ranks=2, slots_per_rank=4)


def test_a_placement_that_fits_the_group_is_read(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    write_placement(path, 4, [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 3, 8)
    placement = read_placement(path, SHAPE)
    assert (placement.generation, placement.num_experts, placement.num_ranks, placement.slots_per_rank) == (4, 8, 2, 4)


@pytest.mark.parametrize(
    ("layers", "num_experts", "problem"),
    [
        ([[list(range(8)), list(range(8, 16))]] * 3, 16, "numExperts is 16, the group has 8; slotsPerRank is 8"),
        ([[[0, 1, 2, 3], [4, 5, 6, 7]]] * 2, 8, "numLayers is 2, the group has 3"),
        ([[[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]] * 3, 8, "ranks is 3, the group has 2"),
        ([[[0, 1, 2, 3, 0], [4, 5, 6, 7, 1]]] * 3, 8, "slotsPerRank is 5, the group has 4"),
    ],
)
def test_a_placement_that_does_not_fit_the_group_is_refused_naming_the_field(
    tmp_path: Path, layers: list[list[list[int]]], num_experts: int, problem: str
) -> None:
    path = tmp_path / "placement.json"
    write_placement(path, 2, layers, num_experts)
    with pytest.raises(ValueError, match="placement generation 2 does not fit the group") as caught:
        read_placement(path, SHAPE)
    assert problem in str(caught.value)


def test_round_robin_fits_its_own_shape() -> None:
    placement = ActivePlacement.round_robin(3, 8, 2, 4)
    assert (len(placement.tables), placement.num_experts, placement.num_ranks, placement.slots_per_rank) == (3, 8, 2, 4)
