"""Mixtral under expert parallelism: the EPLB solver's placement for a skewed load (replicas of the hot experts)
becomes the slot tables of two real gloo ranks, and their logits equal the single-process model's, for Mixtral's
top-2 routing and for Switch's top-1 with capacity (applied before dispatch, so dropping is the same)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2_eplb.solver import solve
from k2_workers.model import K2Config, K2ForCausalLM, switch_routing
from k2_workers.parallel import ExpertParallelExperts, SlotTable, apply_expert_parallel
from tests.support.ports import free_port

WORLD = 2


def _model(switch: bool) -> K2ForCausalLM:
    torch.manual_seed(0)
    config = K2Config.from_preset("mixtral-debug")
    return K2ForCausalLM(switch_routing(config, capacity_factor=1.0) if switch else config).eval()


def _tables() -> list[SlotTable]:
    """The EPLB solver's placement for a skewed load (experts 0 and 1 hot): 3 layers x 2 ranks x 5 slots."""
    load_LE = np.tile(np.array([9.0, 6.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), (3, 1))
    placement_LGS = solve(load_LE, num_gpus=WORLD, slots_per_gpu=5)
    assert all(len(set(layer.reshape(-1).tolist())) == 8 for layer in placement_LGS)  # every expert placed
    return [SlotTable(torch.as_tensor(layer, dtype=torch.long), 8) for layer in placement_LGS]


def _worker(rank: int, port: int, switch: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_default_dtype(torch.float64)
        input_ids = torch.randint(0, 258, (WORLD, 24), generator=torch.Generator().manual_seed(1))
        row = input_ids[rank : rank + 1]
        with torch.no_grad():
            expected = _model(switch)(row).logits
            model = apply_expert_parallel(_model(switch), _tables(), rank)
            assert all(isinstance(moe.experts, ExpertParallelExperts) for moe in model.moe_blocks())
            logits = model(row).logits
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        if switch:
            assert int(model.dropped_token_counts().sum()) > 0  # capacity 1.0 drops some of 24 tokens
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("routing", ["mixtral-top2", "switch-top1-capacity"])
def test_expert_parallel_with_a_solver_placement_matches_single_process(routing: str) -> None:
    mp.spawn(_worker, args=(free_port(), routing.startswith("switch")), nprocs=WORLD, join=True)
