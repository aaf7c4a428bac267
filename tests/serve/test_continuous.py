"""The continuously batched engine in-process (one rank over an in-process gloo group, the tiny k2-debug model in
fp32): on random mixes of prompt lengths, output lengths and arrival steps every greedy completion is the one the
request gets decoded alone (with a roomy cache, and with one so small that sequences are preempted and recomputed);
a shared prompt prefix reuses whole cache blocks and changes no output; a cancelled request frees its blocks at the
next step; and with a placement change between steps the load counters count every routed token exactly once.

Arrival times are counted in engine steps (`GroupEngine.steps`), never in seconds."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.parallel import SlotTable
from k2_workers.serve.engine import Completion, GroupEngine
from k2_workers.serve.metrics import ExpertLoadCollector
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer
from tests.support.waits import wait_for

EOS = ByteTokenizer().eos_id


def _model() -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()


@pytest.fixture(scope="module")
def reference() -> K2ForCausalLM:
    return _model()


@pytest.fixture
def group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        dist.destroy_process_group()


def new_engine(collector: ExpertLoadCollector | None = None, **kwargs: Any) -> GroupEngine:
    model = _model()
    engine = GroupEngine(model, ByteTokenizer(), ResidentExpertWeights(model), 0, 1, collector, **kwargs)
    num_experts = model.config.n_routed_experts
    engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), num_experts, 1, num_experts))
    return engine


def alone(model: K2ForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens: list[int] = generate(model, torch.tensor([prompt]), max_new_tokens)[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@dataclass(frozen=True)
class Ask:
    prompt: list[int]
    max_new_tokens: int
    arrival: int  # the engine step it arrives at


def random_mix(seed: int, count: int, max_prompt: int, max_new: int) -> list[Ask]:
    rng = random.Random(seed)
    asks = [
        Ask(
            [rng.randrange(256) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, max_new), rng.randint(0, 20)
        )
        for _ in range(count)
    ]
    return sorted(asks, key=lambda a: a.arrival)


def serve_all(engine: GroupEngine, asks: list[Ask]) -> list[Completion | BaseException]:
    """Each request sent once the engine has run its arrival step (or sits idle), each read by its own thread."""
    results: list[Completion | BaseException] = [RuntimeError("not run")] * len(asks)

    def call(index: int) -> None:
        try:
            results[index] = engine.generate(asks[index].prompt, GenerateParams(asks[index].max_new_tokens))
        except BaseException as error:
            results[index] = error

    def arrived(ask: Ask) -> bool:
        return engine.steps >= ask.arrival or (engine.scheduler.in_batch == 0 and engine.scheduler.queued == 0)

    threads: list[threading.Thread] = []
    for index, ask in enumerate(asks):
        wait_for(f"step {ask.arrival}", lambda: arrived(ask))  # noqa: B023
        threads.append(threading.Thread(target=call, args=(index,)))
        threads[-1].start()
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.parametrize(
    ("seed", "cache"),
    [(1, {"cache_tokens": 4096, "block_size": 16}), (2, {"cache_tokens": 48, "block_size": 4})],
    ids=["roomy-cache", "tiny-cache-preempts"],
)
def test_every_completion_of_a_random_mix_is_the_one_decoded_alone(
    group: None, reference: K2ForCausalLM, seed: int, cache: dict[str, int]
) -> None:
    engine = new_engine(None, max_batch_size=4, prefill_chunk_tokens=8, batch_wait_s=0.0, **cache)
    asks = random_mix(seed, count=10, max_prompt=30, max_new=12)
    try:
        results = serve_all(engine, asks)
    finally:
        engine.stop()
    for ask, result in zip(asks, results, strict=True):
        assert isinstance(result, Completion), result
        assert result.tokens == alone(reference, ask.prompt, ask.max_new_tokens), ask
    assert max(r.batch_size for r in results if isinstance(r, Completion)) > 1  # requests did share steps
    if cache["cache_tokens"] < 100:
        assert engine.batcher.preemptions > 0  # the preemption path ran, and changed no output
    assert engine.blocks.used == 0


def test_greedy_and_sampled_rows_of_one_step_each_decode_as_they_do_alone(group: None) -> None:
    """The step's greedy rows share one argmax (`_hand_out`); a sampled row beside them keeps its own generator."""
    engine = new_engine(None, max_batch_size=4, batch_wait_s=0.0)
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 20))] for _ in range(4)]
    params = [
        GenerateParams(10),
        GenerateParams(10, temperature=0.9, seed=3),
        GenerateParams(10),
        GenerateParams(10, temperature=1.3, seed=4, top_k=40),
    ]
    together: list[Completion | BaseException] = [RuntimeError("not run")] * 4

    def call(index: int) -> None:
        try:
            together[index] = engine.generate(prompts[index], params[index])
        except BaseException as error:
            together[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    try:
        with engine._group_lock:  # all four are queued before the first step: they decode side by side
            for index, thread in enumerate(threads):
                thread.start()
                wait_for(
                    f"request {index}", lambda n=index + 1: engine.scheduler.queued + engine.scheduler.in_batch == n
                )
        for thread in threads:
            thread.join(timeout=120)
        apart = [engine.generate(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        greedy = engine.generate(prompts[1], GenerateParams(10))
    finally:
        engine.stop()
    assert all(isinstance(r, Completion) for r in together), together
    # the first may be admitted before the others are queued; the other three join it while it decodes
    assert all(isinstance(r, Completion) and r.batch_size > 1 for r in together[1:]), together
    assert [r.tokens for r in together if isinstance(r, Completion)] == [r.tokens for r in apart]
    assert all(r.batch_size == 1 for r in apart)
    assert apart[1].tokens != greedy.tokens, "the sampled row did sample"


def test_a_shared_prefix_reuses_whole_blocks_and_changes_no_output(group: None, reference: K2ForCausalLM) -> None:
    engine = new_engine(block_size=16, batch_wait_s=0.0)
    computed: list[int] = []  # query tokens of each forward of the first attention layer
    attention = engine.model.model.layers[0].self_attn
    assert isinstance(attention, torch.nn.Module)
    attention.register_forward_hook(lambda _m, a, _o: computed.append(a[0].shape[1]))
    system = [random.Random(5).randrange(256) for _ in range(40)]  # two full blocks and 8 tokens
    first, second = [*system, 1, 2, 3], [*system, 9, 8, 7, 6, 5]
    try:
        assert engine.generate(first, GenerateParams(4)).tokens == alone(reference, first, 4)
        assert engine.blocks.reused_blocks == 0
        computed.clear()
        assert engine.generate(second, GenerateParams(4)).tokens == alone(reference, second, 4)
    finally:
        engine.stop()
    assert engine.blocks.reused_blocks == 2  # the system prompt's two full blocks
    assert computed[0] == len(second) - 32  # its prefill computed only what follows them


def test_a_cancelled_request_frees_its_blocks_at_the_next_step(group: None) -> None:
    engine = new_engine(block_size=4, batch_wait_s=0.0)
    try:
        stream = engine.stream(list(range(30, 60)), GenerateParams(max_new_tokens=500))
        reading = iter(stream)
        assert isinstance(reading, Generator)
        next(reading)
        assert engine.blocks.used >= 8  # 30 prompt tokens in blocks of 4
        steps = engine.steps
        reading.close()  # the caller goes away
        wait_for("the row to leave", lambda: engine.scheduler.in_batch == 0)
        assert engine.blocks.used == 0 and engine.steps <= steps + 2
        assert engine.cancelled_requests == 1
    finally:
        engine.stop()


def expert_tokens(collector: ExpertLoadCollector, metric: str) -> dict[str, float]:
    """The counter's total per layer."""
    totals: dict[str, float] = {}
    for family in collector.collect():
        for sample in family.samples:
            if sample.name == metric:
                totals[sample.labels["layer"]] = totals.get(sample.labels["layer"], 0.0) + sample.value
    return totals


# Far more steps than the placement change waits for, so that it lands while this request decodes even on a loaded
# machine (with 40, CI once saw the change at step 40).
LONG_NEW_TOKENS = 120


def test_with_a_placement_change_between_steps_every_routed_token_is_counted_once(
    group: None, reference: K2ForCausalLM
) -> None:
    config = reference.config
    num_layers, num_experts = len(config.moe_layer_indices), config.n_routed_experts
    collector = ExpertLoadCollector("s", "0", 0, num_layers, num_experts, num_experts)
    engine = new_engine(collector, max_batch_size=4, prefill_chunk_tokens=8, batch_wait_s=0.0)
    long = Ask(list(range(40, 50)), LONG_NEW_TOKENS, 0)  # still decoding when the placement changes
    asks = [long, *random_mix(3, count=6, max_prompt=20, max_new=10)]
    reversed_slots = SlotTable.from_nested([list(reversed(range(num_experts)))], num_experts)
    moved = ActivePlacement(1, (reversed_slots,) * num_layers)
    running_at_change: list[int] = []

    def change_placement() -> None:
        deadline = time.monotonic() + 60
        while engine.steps < 4 and time.monotonic() < deadline:  # polled closely: a step takes milliseconds
            time.sleep(0.001)
        running_at_change.append(engine.steps)
        engine.apply_placement(moved)

    changer = threading.Thread(target=change_placement)
    changer.start()
    try:
        results = serve_all(engine, asks)
        changer.join(timeout=60)
    finally:
        engine.stop()
    assert engine.generation == 1 and running_at_change[0] < LONG_NEW_TOKENS <= engine.steps
    assert isinstance(results[0], Completion) and results[0].placement_generation == 0  # began before the change
    assert len(results[0].tokens) == LONG_NEW_TOKENS or results[0].tokens[-1] == EOS
    fed = 0  # tokens through the model: every prompt token, and every generated one but the last
    for ask, result in zip(asks, results, strict=True):
        assert isinstance(result, Completion), result
        assert result.tokens == alone(reference, ask.prompt, ask.max_new_tokens)  # no request dropped or changed
        fed += len(ask.prompt) + len(result.tokens) - 1
    routed = fed * config.num_experts_per_tok
    assert expert_tokens(collector, "k2_expert_tokens_total") == {str(i): routed for i in range(num_layers)}
