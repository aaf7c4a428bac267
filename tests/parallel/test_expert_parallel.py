"""Expert parallelism on two real gloo processes equals the single-process model, forward and backward.

Each rank feeds its own batch row through a model whose experts are sharded by a slot table (replicas included);
the logits must equal the single-process model's for that row, and the expert and non-expert gradients, summed
over ranks, must equal the single-process gradients of the whole batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.model.experts import RoutedExperts
from k2_workers.parallel import ExpertParallelExperts, SlotTable, apply_expert_parallel
from tests.support.listeners import LOOPBACK_HEX, listening_addresses
from tests.support.loopback_group import init_loopback_group
from tests.support.ports import free_port

WORLD = 2
NUM_EXPERTS = 8
# Per MoE layer: [ranks, slots]. Replicated layouts give hot experts 0-3 two replicas, on different ranks.
PLACEMENTS = {
    "disjoint": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "replicated": [[0, 1, 2, 3, 4, 5], [6, 7, 0, 1, 2, 3]],
    "replicated_interleaved": [[5, 3, 0, 6, 1, 7], [2, 4, 3, 1, 0, 6]],
}


def _model() -> K2ForCausalLM:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-debug")
    assert config.n_routed_experts == NUM_EXPERTS
    model = K2ForCausalLM(config)
    with torch.no_grad():  # non-zero correction biases so that selection differs from scoring
        for moe in model.moe_blocks():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, NUM_EXPERTS))
    return model


def _loss(logits: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, logits.shape[-1])
    return (logits * weights).sum()


def _worker(rank: int, port: int, table: list[list[int]]) -> None:
    init_loopback_group(rank, WORLD, port)
    listeners = listening_addresses(os.getpid())
    assert listeners and listeners <= LOOPBACK_HEX, listeners  # the group's store and gloo: loopback only
    try:
        torch.set_default_dtype(torch.float64)  # the two sides sum in different orders; compare the math, not rounding
        torch.manual_seed(1)
        input_ids = torch.randint(0, 258, (WORLD, 24))

        reference = _model()
        ref_logits = reference(input_ids).logits
        _loss(ref_logits).backward()

        model = apply_expert_parallel(_model(), SlotTable.from_nested(table, NUM_EXPERTS), rank)
        assert all(isinstance(moe.experts, ExpertParallelExperts) for moe in model.moe_blocks())
        logits = model(input_ids[rank : rank + 1]).logits
        torch.testing.assert_close(logits, ref_logits[rank : rank + 1], rtol=1e-5, atol=1e-5)

        _loss(logits).backward()
        for (name, param), (ref_name, ref_param) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert name == ref_name
            grad = param.grad
            assert grad is not None, name
            if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
                module = model.get_submodule(name.rsplit(".", 1)[0])
                assert isinstance(module, ExpertParallelExperts)
                full = torch.zeros_like(ref_param).index_add_(0, torch.tensor(module.expert_ids), grad)
            else:
                full = grad.clone()
            dist.all_reduce(full)
            torch.testing.assert_close(
                full, ref_param.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(PLACEMENTS))
def test_expert_parallel_matches_single_process(layout: str) -> None:
    mp.spawn(_worker, args=(free_port(), PLACEMENTS[layout]), nprocs=WORLD, join=True)


def test_slot_table_rejects_a_placement_without_some_expert() -> None:
    with pytest.raises(ValueError, match=r"experts \[7\] have no replica"):
        SlotTable.from_nested([[0, 1, 2, 3], [4, 5, 6, 6]], NUM_EXPERTS)
    with pytest.raises(ValueError, match="expert ids must lie in"):
        SlotTable.from_nested([[0, 1, 2, 3], [4, 5, 6, 8]], NUM_EXPERTS)


def test_replicas_spread_an_experts_assignments_evenly() -> None:
    table = SlotTable.from_nested(PLACEMENTS["replicated"], NUM_EXPERTS)
    num_replicas, rank_EP, slot_EP = table.replicas()
    assert num_replicas.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert rank_EP[0].tolist() == [0, 1] and slot_EP[0].tolist() == [0, 2]
    full = RoutedExperts(NUM_EXPERTS, 4, 8)
    with torch.no_grad():  # torch.empty may hold NaNs, which never compare equal
        for param in full.parameters():
            param.normal_()
    module = ExpertParallelExperts.from_full(full, table, rank=1)
    experts = torch.tensor([0, 0, 0, 0, 6, 0, 1])
    ranks, slots = module._choose_replicas(experts)
    assert ranks.tolist() == [0, 1, 0, 1, 1, 0, 0]
    assert slots.tolist() == [0, 2, 0, 2, 0, 0, 1]
    torch.testing.assert_close(module.gate_proj, full.gate_proj[[6, 7, 0, 1, 2, 3]])


@pytest.mark.parametrize("table", [[list(range(8))], [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]]], ids=["plain", "replicated"])
def test_a_one_rank_group_computes_every_expert_locally_with_no_process_group(table: list[list[int]]) -> None:
    torch.manual_seed(0)
    full = RoutedExperts(NUM_EXPERTS, 4, 8)
    with torch.no_grad():
        for param in full.parameters():
            param.normal_()
    module = ExpertParallelExperts.from_full(full, SlotTable.from_nested(table, NUM_EXPERTS), rank=0)
    x_TD = torch.randn(6, 4, requires_grad=True)
    ids_TK = torch.tensor([[0, 1], [1, 0], [7, 3], [0, 2], [5, 1], [0, 6]])
    weights_TK = torch.rand(6, 2)
    y_TD = module(x_TD, ids_TK, weights_TK)  # no all-to-all: there is no process group to run one
    torch.testing.assert_close(y_TD, full(x_TD, ids_TK, weights_TK))
    assert module.last_tokens_per_slot_S.sum() == ids_TK.numel()  # every assignment computed once
    y_TD.sum().backward()
    assert x_TD.grad is not None and torch.isfinite(x_TD.grad).all() and module.gate_proj.grad is not None
