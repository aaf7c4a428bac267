"""Node topology of a serving's ranks: how many ranks share a node, for the solver's `gpus_per_node`.

The solver reads `gpus_per_node = k` as "ranks 0..k-1 of a group share a node, ranks k..2k-1 the next one, ...", and
prefers copying an expert from a replica on the destination's own node. `ranks_per_node` derives k from where the
scheduler put the rank pods; it answers None (no topology: every copy counts the same) unless every rank of every
group is placed and the nodes hold contiguous, equal, whole blocks of ranks with the same k in every group.

Rank index: the StatefulSet's pod-index label, else the ordinal at the end of the pod name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from k2_eplb.metrics import IntArray, count_cross_node_moves

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
"""Set by the StatefulSet controller on each pod: its ordinal."""


@dataclass(frozen=True)
class RankNode:
    """Where one rank pod runs."""

    group: str
    rank: int
    node: str


def rank_index(name: str, labels: Mapping[str, str]) -> int | None:
    """A rank pod's ordinal: the pod-index label, else the name's trailing `-N`; None when neither is a number."""
    text = labels.get(POD_INDEX_LABEL) or name.rsplit("-", 1)[-1]
    return int(text) if text.isdigit() else None


def ranks_per_node(placed: Iterable[RankNode], ranks_per_group: int, groups: int) -> int | None:
    """k such that in every group node blocks hold ranks [0, k), [k, 2k), ...; None when that does not hold."""
    by_group: dict[str, dict[int, str]] = {}
    for entry in placed:
        by_group.setdefault(entry.group, {})[entry.rank] = entry.node
    if len(by_group) != groups:
        return None
    found: set[int] = set()
    for nodes in by_group.values():
        if sorted(nodes) != list(range(ranks_per_group)):
            return None
        k = _block_size([nodes[r] for r in range(ranks_per_group)])
        if k is None:
            return None
        found.add(k)
    return found.pop() if len(found) == 1 else None


def _block_size(nodes: list[str]) -> int | None:
    """The common length of the runs of equal nodes, when the runs are equal and no node comes back."""
    runs: list[tuple[str, int]] = []
    for node in nodes:
        if runs and runs[-1][0] == node:
            runs[-1] = (node, runs[-1][1] + 1)
        else:
            runs.append((node, 1))
    sizes = {size for _, size in runs}
    distinct = len({node for node, _ in runs}) == len(runs)
    return sizes.pop() if len(sizes) == 1 and distinct else None


def cross_node_copies(current_LGS: IntArray, new_LGS: IntArray, gpus_per_node: int) -> int:
    """Copies of `new` whose expert had no replica anywhere on the destination's node in `current` (these cross the
    inter-node network; the others can come over NVLink)."""
    return count_cross_node_moves(np.asarray(current_LGS), np.asarray(new_LGS), gpus_per_node)
