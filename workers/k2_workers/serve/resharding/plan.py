"""Which rank sends which expert to which rank when a serving group changes placement (pure).

Every rank of the group computes the same list from the old and the new slot table of a layer, so the sends and
receives pair up without any further coordination. A rank receives only the experts that the new table gives it
and that it held nowhere in the old one; an expert it already holds moves between its own slots for free. Each
received expert comes from a rank that held it in the old table; when several did, from the one with the fewest
sends so far (then the lowest rank), so that one hot expert's replicas share the sending.

An expert that no rank held before (a first placement, or a group whose size changed) has no peer source: the
caller reads it from storage.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2_workers.parallel import SlotTable


@dataclass(frozen=True)
class ExpertMove:
    expert: int
    source: int  # rank that holds it under the old table and sends it
    target: int  # rank that needs it under the new table and receives it


def plan_expert_moves(old: SlotTable, new: SlotTable) -> list[ExpertMove]:
    """The peer transfers that turn `old` into `new`, in one order every rank agrees on (target, then expert)."""
    if old.num_ranks != new.num_ranks:
        raise ValueError(f"old table has {old.num_ranks} ranks, new table {new.num_ranks}: no peer transfer")
    old_experts = [set(row) for row in old.table_RS.tolist()]
    holders: dict[int, list[int]] = {}
    for rank, experts in enumerate(old_experts):
        for expert in experts:
            holders.setdefault(expert, []).append(rank)
    sends = [0] * old.num_ranks
    moves = []
    for target, row in enumerate(new.table_RS.tolist()):
        for expert in sorted(set(row) - old_experts[target]):
            if expert not in holders:
                continue  # held nowhere before: from storage
            source = min(holders[expert], key=lambda rank: (sends[rank], rank))
            sends[source] += 1
            moves.append(ExpertMove(expert, source, target))
    return moves
