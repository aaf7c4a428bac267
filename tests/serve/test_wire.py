"""The rank wire protocol's encoding: parameters and prompts read back as sent (temperature in micro-units), and
placements travel as [layers, ranks, slots] tables. The two-rank path runs in test_serving_worker."""

from __future__ import annotations

import torch

from k2_workers.parallel import SlotTable
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.wire import (
    PARAMS_LEN,
    RankWire,
    params_from_row,
    params_row,
    placement_from_tables,
    placement_tables,
)


def test_parameters_read_back_as_sent_with_the_temperature_in_micro_units() -> None:
    params = GenerateParams(max_new_tokens=7, temperature=0.7000004, seed=123, top_k=5, top_p=0.9)
    row = params_row(params, prompt_len=3)
    assert len(row) == PARAMS_LEN and row == [3, 7, 700000, 123, 5, 900000]
    assert params_from_row(row) == (3, GenerateParams(7, 0.7, 123, 5, 0.9))
    assert params_from_row(params_row(GenerateParams(1), 1)) == (1, GenerateParams(1, 0.0, 0, None))


def test_a_one_rank_group_sends_nothing_and_reads_the_batch_back_as_a_follower_would() -> None:
    wire = RankWire(world_size=1, num_experts=4)  # no process group: a one-rank group never broadcasts
    prompts = [[5, 6, 7], [8], [9, 10]]
    params = [GenerateParams(4), GenerateParams(2, 1.5, 9), GenerateParams(1, top_k=3)]
    batch = wire.send_batch(prompts, params, prefill_chunk=64)
    assert [p.tolist() for p in batch.prompts] == prompts
    assert all(p.dtype == torch.long for p in batch.prompts)
    assert batch.params == params and batch.prefill_chunk == 64


def test_placements_travel_as_layer_rank_slot_tables() -> None:
    tables = (SlotTable.from_nested([[0, 1, 2], [3, 0, 1]], 4), SlotTable.from_nested([[3, 2, 1], [0, 3, 2]], 4))
    placement = ActivePlacement(5, tables)
    encoded = placement_tables(placement)
    assert encoded.shape == (2, 2, 3)
    decoded = placement_from_tables(5, encoded, 4)
    assert decoded.generation == 5
    assert [t.table_RS.tolist() for t in decoded.tables] == [t.table_RS.tolist() for t in tables]
