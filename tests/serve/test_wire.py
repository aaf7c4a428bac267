"""The rank wire protocol's encoding: placements travel as [layers, ranks, slots] tables. The two-rank path (steps,
placements, heartbeats, stop) runs in test_serving_worker and test_continuous_group."""

from __future__ import annotations

from k2_workers.parallel import SlotTable
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.wire import placement_from_tables, placement_tables


def test_placements_travel_as_layer_rank_slot_tables() -> None:
    tables = (SlotTable.from_nested([[0, 1, 2], [3, 0, 1]], 4), SlotTable.from_nested([[3, 2, 1], [0, 3, 2]], 4))
    placement = ActivePlacement(5, tables)
    encoded = placement_tables(placement)
    assert encoded.shape == (2, 2, 3)
    decoded = placement_from_tables(5, encoded, 4)
    assert decoded.generation == 5
    assert [t.table_RS.tolist() for t in decoded.tables] == [t.table_RS.tolist() for t in tables]
