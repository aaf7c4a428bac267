"""The peer-transfer plan of a placement change: each rank receives exactly the experts it newly needs, each from
a rank that held it, never one it already holds; several holders share the sending."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_workers.parallel import SlotTable
from k2_workers.serve.resharding import ExpertMove, plan_expert_moves


@st.composite
def tables(draw: st.DrawFn, num_ranks: int, slots: int, num_experts: int) -> SlotTable:
    """A random valid table: a permutation of all experts first, then random replicas."""
    order = draw(st.permutations(range(num_experts)))
    extra = draw(
        st.lists(
            st.integers(0, num_experts - 1),
            min_size=num_ranks * slots - num_experts,
            max_size=num_ranks * slots - num_experts,
        )
    )
    flat = draw(st.permutations([*order, *extra]))
    return SlotTable(torch.tensor(flat).reshape(num_ranks, slots), num_experts)


@st.composite
def table_pairs(draw: st.DrawFn) -> tuple[SlotTable, SlotTable]:
    num_ranks, slots = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, num_ranks * slots))
    return draw(tables(num_ranks, slots, num_experts)), draw(tables(num_ranks, slots, num_experts))


@settings(max_examples=300, deadline=None)
@given(table_pairs())
def test_every_rank_receives_exactly_what_it_newly_needs_from_a_holder(pair: tuple[SlotTable, SlotTable]) -> None:
    old, new = pair
    moves = plan_expert_moves(old, new)
    old_sets = [set(row) for row in old.table_RS.tolist()]
    new_sets = [set(row) for row in new.table_RS.tolist()]
    for rank in range(new.num_ranks):
        received = [m.expert for m in moves if m.target == rank]
        assert sorted(received) == sorted(new_sets[rank] - old_sets[rank])  # no duplicate, nothing already held
    for move in moves:
        assert move.expert in old_sets[move.source]
        assert move.source != move.target
    assert moves == plan_expert_moves(old, new)  # every rank computes the same list


def test_an_unchanged_table_moves_nothing_and_slot_shuffles_are_free() -> None:
    old = SlotTable.from_nested([[0, 1], [2, 3]], 4)
    assert plan_expert_moves(old, old) == []
    assert plan_expert_moves(old, SlotTable.from_nested([[1, 0], [3, 2]], 4)) == []


def test_replicas_share_the_sending() -> None:
    old = SlotTable.from_nested([[0, 1, 2], [0, 3, 4], [5, 6, 1], [2, 3, 4]], 7)
    new = SlotTable.from_nested([[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 0, 4]], 7)
    # ranks 2 and 3 each need expert 0, held by ranks 0 and 1: one copy comes from each
    assert plan_expert_moves(old, new) == [ExpertMove(5, 2, 1), ExpertMove(0, 0, 2), ExpertMove(0, 1, 3)]


def test_tables_of_different_group_sizes_have_no_peer_plan() -> None:
    with pytest.raises(ValueError, match="ranks"):
        plan_expert_moves(SlotTable.from_nested([[0, 1]], 2), SlotTable.from_nested([[0], [1]], 2))
