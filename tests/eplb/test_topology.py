"""Node topology, the pure part: ranks per node from the rank pods' nodes, and copies that cross nodes."""

from __future__ import annotations

import numpy as np
import pytest

from k2_api import round_robin
from k2_eplb.metrics import count_moves
from k2_eplb.solver import solve
from k2_eplb.topology import POD_INDEX_LABEL, RankNode, cross_node_copies, rank_index, ranks_per_node


def placed(nodes: list[str], group: str = "0") -> list[RankNode]:
    return [RankNode(group, rank, node) for rank, node in enumerate(nodes)]


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (["a", "a", "b", "b"], 2),
        (["a", "a", "a", "a"], 4),
        (["a", "b", "c", "d"], 1),
        (["a", "b", "a", "b"], None),  # a node's ranks are not contiguous
        (["a", "a", "a", "b"], None),  # unequal blocks
        (["a", "a", "b", "b", "a", "a"], None),  # a node comes back
    ],
)
def test_ranks_per_node(nodes: list[str], expected: int | None) -> None:
    assert ranks_per_node(placed(nodes), len(nodes), 1) == expected


def test_every_rank_of_every_group_must_be_placed() -> None:
    assert ranks_per_node(placed(["a", "a", "b"]), 4, 1) is None
    assert ranks_per_node(placed(["a", "a", "b", "b"]), 4, 2) is None  # the second group has no placed rank
    both = placed(["a", "a", "b", "b"]) + placed(["c", "c", "d", "d"], group="1")
    assert ranks_per_node(both, 4, 2) == 2
    assert ranks_per_node(placed(["a", "a", "b", "b"]) + placed(["c"] * 4, group="1"), 4, 2) is None


def test_rank_index_from_the_pod_index_label_else_the_name() -> None:
    assert rank_index("k2-g0-3", {POD_INDEX_LABEL: "5"}) == 5
    assert rank_index("k2-g0-3", {}) == 3
    assert rank_index("k2-g0-x", {}) is None


def test_the_solver_given_the_topology_crosses_nodes_less() -> None:
    """What `gpus_per_node` buys: the same budget, fewer copies from another node (4 nodes of 4 ranks)."""
    layers, experts, gpus, slots = 4, 32, 16, 3
    start = np.array([t.slots for t in round_robin(layers, experts, gpus, slots)], dtype=np.int64)
    crossed = {}
    for seed in range(3):
        load = np.random.default_rng(seed).lognormal(0.0, 1.0, (layers, experts))
        for per_node in (None, 4):
            new = solve(load, gpus, slots, current=start, max_moves=8, gpus_per_node=per_node)
            assert count_moves(start, new) <= 8
            crossed[seed, per_node] = cross_node_copies(start, new, 4)
    assert all(crossed[seed, 4] <= crossed[seed, None] for seed in range(3))
    assert sum(crossed[seed, 4] for seed in range(3)) < sum(crossed[seed, None] for seed in range(3))


def test_cross_node_copies_counts_copies_without_a_replica_on_the_destinations_node() -> None:
    start = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]]], dtype=np.int64)  # nodes of 2 GPUs: {0,1,2,3}, {4,5,6,7}
    new = np.array([[[0, 2], [2, 3], [4, 0], [6, 7]]], dtype=np.int64)  # 2 from its node-mate, 0 from another node
    assert count_moves(start, new) == 2
    assert cross_node_copies(start, new, 2) == 1
    assert cross_node_copies(start, new, 1) == 2
