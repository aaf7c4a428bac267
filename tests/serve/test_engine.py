"""The serving engine in-process (one rank over an in-process gloo group): concurrent callers share a batch and
each gets its own completion, an empty prompt is refused, a failed batch fails every caller as a server
error, and stop drains the queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.serve import engine as engine_module
from k2_workers.serve.engine import Completion, GroupEngine
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer

PROMPTS = ["a", "the expert placement", "K2", "rank to rank moves"]


def _model() -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()


@pytest.fixture
def engine() -> Iterator[GroupEngine]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        model = _model()
        # a generous wait: callers started together land in one batch however slowly the threads start
        engine = GroupEngine(model, ByteTokenizer(), ResidentExpertWeights(model), 0, 1, batch_wait_s=0.5)
        num_experts = model.config.n_routed_experts
        engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), num_experts, 1, num_experts))
        yield engine
        engine.stop()
    finally:
        dist.destroy_process_group()


def _concurrently(engine: GroupEngine, asks: list[tuple[list[int], GenerateParams]]) -> list[Completion | Exception]:
    results: list[Completion | Exception] = [RuntimeError("not run")] * len(asks)

    def call(index: int) -> None:
        try:
            results[index] = engine.generate(*asks[index])
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_callers_share_a_batch_and_each_gets_its_own_completion(engine: GroupEngine) -> None:
    tokenizer, reference = ByteTokenizer(), _model()
    asks = [(tokenizer.encode(text), GenerateParams(max_new_tokens=3 + 2 * i)) for i, text in enumerate(PROMPTS)]
    results = _concurrently(engine, asks)
    for (prompt, params), result in zip(asks, results, strict=True):
        assert isinstance(result, Completion), result
        alone = generate(reference, torch.tensor([prompt]), params.max_new_tokens)[0, len(prompt) :].tolist()
        expected = alone[: alone.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in alone else alone
        assert result.tokens == expected
        assert result.batch_size == len(PROMPTS) and result.placement_generation == 0


def test_an_empty_prompt_is_refused_before_it_reaches_the_group(engine: GroupEngine) -> None:
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([], GenerateParams(max_new_tokens=2))


def test_a_failed_batch_fails_each_of_its_callers_as_a_server_error(
    engine: GroupEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: a decoding failure inside the group (a collective timing out, say) cannot be produced on one rank.
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a rank stopped answering")

    monkeypatch.setattr(engine_module, "generate_batch", broken)
    asks = [(ByteTokenizer().encode(text), GenerateParams(max_new_tokens=2)) for text in PROMPTS[:2]]
    results = _concurrently(engine, asks)
    for result in results:  # RuntimeError, not the ValueError inside, which the HTTP layer would answer with 400
        assert isinstance(result, RuntimeError) and "decoding failed: a rank stopped" in str(result), result
    monkeypatch.undo()
    assert isinstance(engine.generate(*asks[0]), Completion)  # the engine goes on serving


def test_stop_finishes_the_queued_requests_first(engine: GroupEngine) -> None:
    asks = [(ByteTokenizer().encode(text), GenerateParams(max_new_tokens=4)) for text in PROMPTS]
    results: list[Completion | Exception] = []
    caller = threading.Thread(target=lambda: results.extend(_concurrently(engine, asks)))
    caller.start()
    deadline = time.monotonic() + 60
    while engine.scheduler.queued < len(asks) and time.monotonic() < deadline:  # all queued, the batch wait not over
        time.sleep(0.01)
    engine.stop()
    caller.join(timeout=120)
    assert len(results) == len(asks) and all(isinstance(r, Completion) for r in results), results
    with pytest.raises(RuntimeError, match="stopping"):
        engine.generate(*asks[0])
