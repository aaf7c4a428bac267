"""Mixtral under expert parallelism: the EPLB solver's placement for a skewed load (replicas of the hot experts)
becomes the slot tables of two real gloo ranks, and their logits equal the single-process model's, for Mixtral's
top-2 routing and for Switch's top-1 with capacity (applied before dispatch, so dropping is the same), and so do
the gradients summed over the ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2_eplb.solver import solve
from k2_workers.model import K2Config, K2ForCausalLM, switch_routing
from k2_workers.parallel import ExpertParallelExperts, SlotTable, apply_expert_parallel
from tests.support.loopback_group import init_loopback_group
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


def _summed_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient summed over the ranks; an expert-parallel shard's slots go back to their experts."""
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.clone()
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, ExpertParallelExperts):
                ids = torch.tensor(module.expert_ids)
                grad = torch.zeros(8, *grad.shape[1:], dtype=grad.dtype).index_add_(0, ids, grad)
        dist.all_reduce(grad)
        grads[name] = grad
    return grads


def _worker(rank: int, port: int, switch: bool) -> None:
    init_loopback_group(rank, WORLD, port)
    try:
        torch.set_default_dtype(torch.float64)
        input_ids = torch.randint(0, 258, (WORLD, 24), generator=torch.Generator().manual_seed(1))
        row = input_ids[rank : rank + 1]  # each rank its own row; capacity applies per forward, so per row
        reference = _model(switch)
        expected = reference(row).logits
        model = apply_expert_parallel(_model(switch), _tables(), rank)
        assert all(isinstance(moe.experts, ExpertParallelExperts) for moe in model.moe_blocks())
        logits = model(row).logits
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
        if switch:
            assert int(model.dropped_token_counts().sum()) > 0  # capacity 1.0 drops some of 24 tokens

        weights = torch.linspace(-1.0, 1.0, logits.shape[-1])
        (expected * weights).sum().backward()
        (logits * weights).sum().backward()
        want, got = _summed_grads(reference), _summed_grads(model)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("routing", ["mixtral-top2", "switch-top1-capacity"])
def test_expert_parallel_with_a_solver_placement_matches_single_process(routing: str) -> None:
    mp.spawn(_worker, args=(free_port(), routing.startswith("switch")), nprocs=WORLD, join=True)
