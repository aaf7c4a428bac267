"""The continuous batch across a real two-rank expert-parallel group (gloo, two processes): rank 0 decides every step
and broadcasts it, rank 1 runs the same step on its own paged cache, and every greedy completion of a concurrent mix
(a cache small enough to preempt, a placement change between steps) is the one the single-process model decodes
alone. The follower's own cache settings differ: it takes rank 0's cache shape from the steps it receives."""

from __future__ import annotations

import random
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.parallel import SlotTable
from k2_workers.serve.engine import Completion, GroupEngine
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer
from tests.support.loopback_group import init_loopback_group
from tests.support.ports import free_port
from tests.support.waits import wait_for

WORLD = 2
EOS = ByteTokenizer().eos_id


def _model() -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()


def _placements(num_layers: int, num_experts: int) -> tuple[ActivePlacement, ActivePlacement]:
    first = ActivePlacement.round_robin(num_layers, num_experts, WORLD, num_experts // WORLD)
    swapped = SlotTable.from_nested([[4, 5, 6, 7], [0, 1, 2, 3]], num_experts)  # every expert moves
    return first, ActivePlacement(1, (swapped,) * num_layers)


def _asks() -> list[tuple[list[int], int]]:
    rng = random.Random(7)
    return [([rng.randrange(256) for _ in range(rng.randint(10, 28))], rng.randint(6, 12)) for _ in range(8)]


def _worker(rank: int, port: int) -> None:
    init_loopback_group(rank, WORLD, port)
    torch.set_num_threads(1)
    model = _model()
    cache_tokens, block_size = (40, 4) if rank == 0 else (1024, 16)  # the follower's own settings differ
    engine = GroupEngine(
        model,
        ByteTokenizer(),
        ResidentExpertWeights(model),
        rank,
        WORLD,
        max_batch_size=4,
        batch_wait_s=0.0,
        cache_tokens=cache_tokens,
        block_size=block_size,
    )
    num_layers, num_experts = len(list(model.moe_blocks())), model.config.n_routed_experts
    first, moved = _placements(num_layers, num_experts)
    if rank != 0:
        engine.follow()
        dist.destroy_process_group()
        return
    engine.apply_placement(first)
    asks = _asks()
    results: list[Completion | BaseException] = [RuntimeError("not run")] * len(asks)

    def call(index: int) -> None:
        try:
            results[index] = engine.generate(asks[index][0], GenerateParams(asks[index][1]))
        except BaseException as error:
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(asks))]
    with engine._group_lock:  # every request arrives before the first step, in index order: the same schedule
        for index, thread in enumerate(threads):  # in every run (started at once, their order was the threads')
            thread.start()
            wait_for(f"request {index}", lambda n=index + 1: engine.scheduler.queued + engine.scheduler.in_batch == n)
    while engine.steps < 3:
        threading.Event().wait(0.01)
    engine.apply_placement(moved)  # between two steps, while requests decode
    for thread in threads:
        thread.join(timeout=300)
    engine.stop()
    dist.destroy_process_group()
    reference = _model()
    for (prompt, max_new), result in zip(asks, results, strict=True):
        assert isinstance(result, Completion), result
        tokens = generate(reference, torch.tensor([prompt]), max_new)[0, len(prompt) :].tolist()
        assert result.tokens == (tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens), prompt
    assert engine.generation == 1
    assert engine.batcher.preemptions > 0


@pytest.mark.distributed
def test_a_two_rank_group_decodes_a_continuous_batch_in_lockstep() -> None:
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)  # type: ignore[attr-defined,no-untyped-call]
