"""The official `openai` client against a real one-rank worker process and a frontend on loopback: models, completions
and chat, streamed and not (the stream concatenates to the greedy completion, which equals /v1/generate's), usage
in tokens, stop sequences, and OpenAI's error JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from k2_workers.serve.chat import default_chat_prompt
from k2_workers.serve.openai_request import Message
from k2_workers.tokenizer import ByteTokenizer
from tests.serve.test_serving_worker import manifest
from tests.serve.worker_process import request, serve_processes, wait_healthy
from tests.support.ports import free_port

MODEL = "k2-debug-serve"  # the example K2Serving's metadata.name
PROMPT = "The expert placement is a Kubernetes object"
MESSAGES = [Message("system", "be brief"), Message("user", "what is a placement?")]
MAX_TOKENS = 10
TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The rank's and the frontend's base URLs."""
    tmp_path = tmp_path_factory.mktemp("openai")
    rank_port, frontend_port = free_port(), free_port()
    rank = f"http://127.0.0.1:{rank_port}"
    argv = [["--config", str(manifest(tmp_path, 1, 0)), "--port", str(rank_port), "--metrics-port", "-1"]]
    argv.append(["--frontend", "--endpoints", rank, "--port", str(frontend_port)])
    with serve_processes(argv, [{"RANK": "0", "WORLD_SIZE": "1"}, {}]) as (worker, frontend):
        wait_healthy(rank, worker)
        wait_healthy(f"http://127.0.0.1:{frontend_port}", frontend)
        yield {"rank": rank, "frontend": f"http://127.0.0.1:{frontend_port}"}


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine_tokens(base: str, prompt: str) -> list[int]:
    """What the engine generates greedily, by our own /v1/generate."""
    status, body = request(base + "/v1/generate", {"prompt": prompt, "max_new_tokens": MAX_TOKENS})
    assert status == 200, body
    tokens: list[int] = body["tokens"]
    return tokens


def shown(tokens: list[int]) -> str:
    return TOKENIZER.decode(tokens[:-1] if tokens[-1] == TOKENIZER.eos_id else tokens)


def raw_post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_completions_streamed_or_not_equal_the_engine_output(urls: dict[str, str], via: str) -> None:
    api = client(urls[via])
    assert [m.id for m in api.models.list().data] == [MODEL]
    tokens = engine_tokens(urls["rank"], PROMPT)
    answer = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].text == shown(tokens)
    assert answer.choices[0].finish_reason == ("stop" if tokens[-1] == TOKENIZER.eos_id else "length")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(TOKENIZER.encode(PROMPT)), len(tokens))
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + len(tokens)

    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    assert len([c for c in chunks if c.choices]) > 2  # one chunk per token, not one in all
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokens)


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_chat_renders_chatml_and_streams_the_same_answer(urls: dict[str, str], via: str) -> None:
    api = client(urls[via])
    messages: Any = [{"role": m.role, "content": m.content} for m in MESSAGES]
    prompt = default_chat_prompt(MESSAGES)  # the debug model has no checkpoint, so no chat template
    tokens = engine_tokens(urls["rank"], prompt)
    answer = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == shown(tokens)
    assert answer.usage is not None and answer.usage.prompt_tokens == len(TOKENIZER.encode(prompt))
    assert answer.usage.completion_tokens == len(tokens)
    stream = api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == answer.choices[0].message.content


def test_a_stop_sequence_cuts_the_completion(urls: dict[str, str]) -> None:
    api = client(urls["rank"])
    text = shown(engine_tokens(urls["rank"], PROMPT))
    stop = next(c for c in text[2:] if c != "\ufffd")
    answer = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert answer.choices[0].text == text[: text.find(stop)]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens <= len(TOKENIZER.encode(text))


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_errors_are_openai_error_json(urls: dict[str, str], via: str) -> None:
    base = urls[via]
    status, body = raw_post(base + "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 2})
    assert status == 400 and body["error"]["param"] == "n", body
    assert body["error"]["type"] == "invalid_request_error" and "n=1" in body["error"]["message"]
    status, body = raw_post(base + "/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "messages", body
    api = client(base)
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="other", prompt=PROMPT, max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=2)
    assert too_many.value.param == "logprobs"
    status, body = raw_post(base + "/v1/nope", {})
    assert status == 404 and "no route" in body["error"]["message"]
    assert request(base + "/v1/completions", b"x" * (2 << 20))[0] == 413


def test_top_p_and_seed_reach_the_sampler(urls: dict[str, str]) -> None:
    api = client(urls["rank"])
    greedy = shown(engine_tokens(urls["rank"], PROMPT))

    def sampled(**fields: Any) -> str:
        answer = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.5, **fields)
        return str(answer.choices[0].text)

    assert sampled(top_p=1e-6, seed=3) == greedy  # a nucleus of one token: the most likely one
    assert sampled(seed=5) == sampled(seed=5)  # each request samples with its own generator
    assert len({sampled(seed=s) for s in range(4)}) > 1
