"""The serving engine in-process (one rank over an in-process gloo group): concurrent callers share a batch and
each gets its own completion, an empty prompt is refused, a failed batch fails every caller as a server
error, and stop drains the queue."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.serve import engine as engine_module
from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.engine import Completion, GroupEngine
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.rank_routes import rank_routes
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer
from tests.serve.worker_process import request, request_with_headers
from tests.support.waits import wait_for

PROMPTS = ["a", "the expert placement", "K2", "rank to rank moves"]


def _model() -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()


EngineFactory = Callable[..., GroupEngine]


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """Builds one-rank engines (keyword arguments go to GroupEngine) with a placement applied; stops them after."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    engines: list[GroupEngine] = []

    def build(**kwargs: Any) -> GroupEngine:
        model = _model()
        # a generous wait: callers started together land in one batch however slowly the threads start
        kwargs.setdefault("batch_wait_s", 0.5)
        engine = GroupEngine(model, ByteTokenizer(), ResidentExpertWeights(model), 0, 1, **kwargs)
        num_experts = model.config.n_routed_experts
        engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), num_experts, 1, num_experts))
        engines.append(engine)
        return engine

    try:
        yield build
        for engine in engines:
            engine.stop()
    finally:
        dist.destroy_process_group()


@pytest.fixture
def engine(make_engine: EngineFactory) -> GroupEngine:
    return make_engine()


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


def test_a_failed_step_fails_each_of_its_callers_as_a_server_error(
    engine: GroupEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: a decoding failure inside the group (a collective timing out, say) cannot be produced on one rank.
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a rank stopped answering")

    monkeypatch.setattr(engine_module, "run_step", broken)
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


def test_a_prompt_past_the_models_positions_is_refused_in_tokens_with_a_400(engine: GroupEngine) -> None:
    # 600 emoji are 600 characters but 2,400 byte tokens: more than k2-debug's 2,048 positions.
    server = serve_routes(rank_routes(engine, 64), "127.0.0.1", 0)
    try:
        status, body = request(f"http://127.0.0.1:{server.server_port}/v1/generate", {"prompt": "\U0001f600" * 600})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 400
    assert body["error"] == "prompt: 2400 tokens + max_new_tokens 16 pass the model's max_position_embeddings 2048"
    assert engine.scheduler.queued == 0


def test_a_prompt_longer_than_max_prompt_tokens_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine(max_prompt_tokens=100)
    with pytest.raises(ValueError, match="prompt: 101 tokens, more than --max-prompt-tokens 100"):
        engine.generate([7] * 101, GenerateParams(max_new_tokens=2))
    assert len(engine.generate([7] * 100, GenerateParams(max_new_tokens=2)).tokens) == 2


def test_prefill_runs_in_chunks_and_gives_the_same_completion(make_engine: EngineFactory) -> None:
    engine = make_engine(prefill_chunk_tokens=16)
    queries: list[int] = []  # query tokens of each attention forward
    hooks = [
        layer.self_attn.register_forward_hook(lambda _m, args, _o: queries.append(args[0].shape[1]))
        for layer in engine.model.model.layers
    ]
    prompt = ByteTokenizer().encode("the expert placement moves experts rank to rank " * 2)  # 96 tokens
    try:
        completion = engine.generate(prompt, GenerateParams(max_new_tokens=4))
    finally:
        for hook in hooks:
            hook.remove()
    assert max(queries) == 16 and len(prompt) == 96
    alone = generate(_model(), torch.tensor([prompt]), 4)[0, len(prompt) :].tolist()
    assert completion.tokens == alone


def test_a_full_queue_answers_429_with_retry_after_and_a_late_request_504(make_engine: EngineFactory) -> None:
    engine = make_engine(max_queue=1, batch_wait_s=0.0)
    engine.generate([7], GenerateParams(max_new_tokens=2))  # warm: a first batch's one-time set-up can pass 2 s
    engine.request_timeout_s = 2.0
    server = serve_routes(rank_routes(engine, 64), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/v1/generate"
    answers: list[tuple[int, dict[str, Any]]] = []
    try:
        with engine._group_lock:  # the group is busy (a placement being applied): batches wait
            first = threading.Thread(target=lambda: answers.append(request(url, {"prompt": "a"})))
            first.start()
            wait_for("the first request taken into a batch", lambda: engine.scheduler.in_batch == 1)
            second = threading.Thread(target=lambda: answers.append(request(url, {"prompt": "b"})))
            second.start()
            wait_for("a second request queued", lambda: engine.scheduler.queued == 1)
            status, body, headers = request_with_headers(url, {"prompt": "c"})
            assert status == 429 and "queue is full" in body["error"] and headers["Retry-After"] == "1"
            second.join(timeout=60)
            first.join(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    by_status = sorted(status for status, _ in answers)
    assert by_status == [504, 504], answers
    assert engine.scheduler.queued == 0
    assert len(engine.generate([7, 8], GenerateParams(max_new_tokens=2)).tokens) == 2  # the engine still serves


def test_a_broken_group_is_not_ready_and_refuses_requests_with_503(engine: GroupEngine) -> None:
    # A seam: a broken group needs a failed collective between ranks (test_group_faults.py kills real ranks, whose
    # processes then exit); here the engine is marked broken as its collective wrapper would mark it.
    routes = rank_routes(engine, 64)
    healthy = routes[("GET", "/healthz")](b"")
    assert isinstance(healthy, tuple) and healthy[0] == 200
    engine.broken = "RuntimeError: Connection closed by peer"
    server = serve_routes(routes, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        health, generated = request(base + "/healthz"), request(base + "/v1/generate", {"prompt": "a"})
    finally:
        server.shutdown()
        server.server_close()
    assert health == (503, {"error": "the group is broken: RuntimeError: Connection closed by peer"})
    assert generated[0] == 503 and "broken" in generated[1]["error"]
    engine.broken = None  # the fixture stops the engine


def test_a_client_that_disconnects_while_queued_takes_its_request_out_of_the_queue(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(batch_wait_s=0.0)
    server = serve_routes(openai_routes(engine, 64, "m", None), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/v1/completions"
    answers: list[tuple[int, dict[str, Any]]] = []
    body = b'{"prompt": "b", "max_tokens": 2, "stream": true}'
    try:
        with engine._group_lock:  # the group is busy: the first request's batch waits, the second stays queued
            first = threading.Thread(target=lambda: answers.append(request(url, {"prompt": "a", "max_tokens": 2})))
            first.start()
            wait_for("the first request taken into a batch", lambda: engine.scheduler.in_batch == 1)
            with socket.create_connection(("127.0.0.1", server.server_port), timeout=20) as client:
                head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                client.sendall(head + body)
                wait_for("the second request queued", lambda: engine.scheduler.queued == 1)
            wait_for("the disconnected request to leave the queue", lambda: engine.scheduler.queued == 0)
            assert engine.scheduler.in_batch == 1  # still held: the second request never ran
        first.join(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert [status for status, _ in answers] == [200]
