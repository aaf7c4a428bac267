"""True token streaming, in-process (one rank over an in-process gloo group, its HTTP server and a frontend before it):
a greedy stream concatenates to the unstreamed completion (the real `openai` client, completions and chat, with and
without a stop sequence), its first chunk reaches the client while the request is still decoding, and a caller that
leaves midway takes its request out of the batch.

Ordering, never timing: `Steps` counts the decoding forwards (one token per row) with their batch sizes, and can hold
one of them until something happened elsewhere (a chunk received, a request cancelled). A token is handed out before
the forward that follows it, so holding the k-th forward means: k tokens are out, and the k+1-th is not decoded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.frontend import GroupRouter, frontend_routes
from k2_workers.serve.openai_response import CompletionText, finish
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.rank_routes import rank_routes
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer
from tests.support.waits import wait_for

MODEL = "k2-stream"
PROMPT = "The expert placement is a Kubernetes object"
HOLD_LIMIT_S = 60.0  # a held step gives up after this long (and the test fails on what it awaited)
TOKENIZER = ByteTokenizer()


class Steps:
    """Wraps the model's forward: records the batch size of every decoding forward, and holds the `hold_at`-th one
    (counted from `reset`) until `until()` is true; `held_until` says whether it came true."""

    def __init__(self, model: K2ForCausalLM) -> None:
        self.sizes: list[int] = []
        self._hold_at: int | None = None
        self._until: Callable[[], bool] = lambda: True
        self.held_until: bool | None = None
        original = model.forward

        def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if input_ids.shape[1] == 1:  # a decoding step (every prompt here is longer than one token)
                self.sizes.append(input_ids.shape[0])
                if len(self.sizes) == self._hold_at:
                    self.held_until = _wait(self._until)
            return original(input_ids, *args, **kwargs)

        model.forward = forward  # type: ignore[method-assign]

    def reset(self, hold_at: int | None = None, until: Callable[[], bool] = lambda: True) -> None:
        self.sizes, self._hold_at, self._until, self.held_until = [], hold_at, until, None


def one_rank_engine() -> tuple[GroupEngine, Steps]:
    """A one-rank group of the k2-debug model (seed 0) in this process, its placement applied, its decoding steps
    recorded; the caller destroys the process group."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    steps = Steps(model)
    engine = GroupEngine(model, TOKENIZER, ResidentExpertWeights(model), 0, 1, batch_wait_s=0.0)
    experts = model.config.n_routed_experts
    engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), experts, 1, experts))
    return engine, steps


def _wait(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class Served:
    engine: GroupEngine
    steps: Steps
    urls: dict[str, str]  # "rank" and "frontend" base URLs


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine, steps = one_rank_engine()
    rank = serve_routes(rank_routes(engine, 256) | openai_routes(engine, 256, MODEL, None), "127.0.0.1", 0)
    rank_url = f"http://127.0.0.1:{rank.server_port}"
    frontend = serve_routes(frontend_routes(GroupRouter([rank_url])), "127.0.0.1", 0)
    try:
        yield Served(engine, steps, {"rank": rank_url, "frontend": f"http://127.0.0.1:{frontend.server_port}"})
    finally:
        for server in (frontend, rank):
            server.shutdown()
            server.server_close()
        engine.stop()
        dist.destroy_process_group()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def direct(engine: GroupEngine, prompt: str, max_tokens: int) -> list[int]:
    """The engine's own greedy completion."""
    return engine.generate(TOKENIZER.encode(prompt), GenerateParams(max_new_tokens=max_tokens)).tokens


@pytest.mark.parametrize("via", ["rank", "frontend"])
@pytest.mark.parametrize("with_stop", [False, True])
def test_a_greedy_stream_concatenates_to_the_unstreamed_completion(served: Served, via: str, with_stop: bool) -> None:
    api, max_tokens = client(served.urls[via]), 24
    served.steps.reset()
    tokens = direct(served.engine, PROMPT, max_tokens)
    expected = finish(tokens, TOKENIZER.decode, TOKENIZER.eos_id, [])
    stop = [ascii_stop(expected.text)] if with_stop else None  # a stop inside the completion cuts it there
    answer = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stop=stop)
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=max_tokens,
            temperature=0,
            stop=stop,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == answer.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # one chunk per token, not one in all
    assert chunks[-1].usage is not None and answer.usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish_reasons == [answer.choices[0].finish_reason]
    if with_stop:
        assert stop is not None and streamed == expected.text[: expected.text.find(stop[0])]
        assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens < len(tokens)
    else:
        assert streamed == expected.text and answer.usage.completion_tokens == len(tokens)

    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    deltas = api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == chat.choices[0].message.content


def ascii_stop(text: str) -> str:
    """Two printable ASCII characters from inside `text` (a stop that cannot match a character not complete yet)."""
    pairs = (text[i : i + 2] for i in range(3, len(text) - 1))
    return next(pair for pair in pairs if pair.isascii() and pair.isprintable())


def first_piece_at(tokens: list[int]) -> int:
    """How many tokens the stream needs before it sends its first text."""
    text = CompletionText(TOKENIZER.decode, TOKENIZER.eos_id, [])
    return next(k for k, token in enumerate(tokens, 1) if text.push(token))


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_the_first_chunk_arrives_while_the_request_is_still_decoding(served: Served, via: str) -> None:
    max_tokens = 12
    tokens = direct(served.engine, PROMPT, max_tokens)
    assert len(tokens) == max_tokens  # no EOS: the request decodes all its steps
    hold_at = first_piece_at(tokens)  # its first text is out once this many tokens are, and the rest is not
    assert hold_at < max_tokens - 1
    first_chunk = threading.Event()
    served.steps.reset(hold_at, first_chunk.is_set)
    api = client(served.urls[via])
    pieces = []
    for chunk in api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            pieces.append(chunk.choices[0].text)
            first_chunk.set()  # releases the held step: the client has a chunk while decoding is not over
    assert served.steps.held_until is True
    assert len(served.steps.sizes) == max_tokens - 1  # every step ran: nothing was cut short
    assert "".join(pieces) == finish(tokens, TOKENIZER.decode, TOKENIZER.eos_id, []).text


def test_a_stream_left_midway_takes_its_row_out_of_the_batch(served: Served) -> None:
    engine, max_tokens = served.engine, 16
    alone = direct(engine, "rank to rank moves", max_tokens)
    assert len(alone) == max_tokens
    wait_for("the last batch to end", lambda: engine.scheduler.in_batch == 0)  # its caller returns a moment before
    with engine._group_lock:  # the group is busy: the next two requests queue and then share one batch
        first = engine.stream(TOKENIZER.encode("a first one"), GenerateParams(max_new_tokens=1))
        wait_for("the first request taken into a batch", lambda: engine.scheduler.in_batch == 1)
        left = engine.stream(TOKENIZER.encode("the expert placement"), GenerateParams(max_new_tokens=max_tokens))
        kept = engine.stream(TOKENIZER.encode("rank to rank moves"), GenerateParams(max_new_tokens=max_tokens))
        assert engine.scheduler.queued == 2
        cancelled_before = engine.cancelled_requests
        served.steps.reset(1, lambda: engine.cancelled_requests > cancelled_before)
    assert len(list(first)) == 1
    reading = iter(left)
    next(reading)  # its first token, then the caller goes away
    reading.close()
    assert list(kept) == alone  # the other request goes on, and its completion is as if alone
    assert left.batch_size == kept.batch_size == 2
    assert served.steps.held_until is True
    # the first step (held until the cancel) with both rows, then only the kept one
    assert served.steps.sizes == [2] + [1] * (max_tokens - 2)


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_a_client_that_disconnects_mid_stream_cancels_its_request(served: Served, via: str) -> None:
    engine, max_tokens = served.engine, 64
    assert len(direct(engine, PROMPT, max_tokens)) == max_tokens  # uncancelled, it would decode 63 steps
    cancelled_before = engine.cancelled_requests
    served.steps.reset(1, lambda: engine.cancelled_requests > cancelled_before)
    host, port = served.urls[via].removeprefix("http://").split(":")
    body = b'{"prompt": "%s", "max_tokens": %d, "stream": true}' % (PROMPT.encode(), max_tokens)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        connection.sendall(head + body)
        received = b""
        while b"data: " not in received and (piece := connection.recv(65536)):
            received += piece
    assert b"200 OK" in received
    wait_for("the request's batch to end", lambda: engine.scheduler.in_batch == 0 and served.steps.held_until)
    assert served.steps.held_until is True  # the server noticed the client gone while the request decoded
    assert served.steps.sizes == [1]  # and the request stopped at the next step: 1 of its 63
    assert len(direct(engine, PROMPT, 4)) == 4  # the engine goes on serving
