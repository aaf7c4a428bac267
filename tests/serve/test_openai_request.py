"""OpenAI request parsing and answer building, pure: any JSON body parses or is refused naming its field, stop
sequences cut the completion, streams carry the whole text, chat prompts follow the template or ChatML, and the
routes over a stub engine answer refusals as OpenAI errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2_workers.serve.chat import default_chat_prompt, load_chat_template, render_chat
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.http_routes import HttpError, Stream, error_body
from k2_workers.serve.openai_request import Message, parse_chat, parse_completions
from k2_workers.serve.openai_response import error_document, finish
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.request import GenerateParams, RequestError, parse_generate
from k2_workers.serve.scheduler import QueueFull, Stopping
from k2_workers.serve.token_stream import TokenStream
from k2_workers.tokenizer import ByteTokenizer

LIMIT = 64
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream"]
FIELDS += ["stream_options", "logprobs", "best_of", "echo", "presence_penalty", "logit_bias", "tools", "user"]
# Any character, lone surrogates included: JSON's "\\ud800" escape decodes to one.
texts = st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff"]), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_any_json_body_parses_or_is_refused_naming_a_field(document: dict[str, Any]) -> None:
    for parse in (parse_completions, parse_chat):
        try:
            request = parse(json.dumps(document).encode(), LIMIT)
        except RequestError as error:
            named = [*document, *FIELDS, "body"]
            assert any(str(error).startswith((f"{f}: ", f"{f}[", f"{f}.")) for f in named), error
        else:
            assert 1 <= request.params.max_new_tokens <= LIMIT
            for text in [request.prompt or "", *request.stop, *(m.content for m in request.messages)]:
                text.encode("utf-8")  # valid Unicode: a tokenizer and a UTF-8 answer can take it


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_parse_or_are_refused(body: bytes) -> None:
    for parse in (parse_completions, parse_chat):
        with contextlib.suppress(RequestError):
            parse(body, LIMIT)


def test_supported_fields_become_generate_params() -> None:
    body = {"model": "m", "prompt": ["hi"], "max_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "x"}
    request = parse_completions(json.dumps(body).encode(), LIMIT)
    assert request.prompt == "hi" and request.model == "m" and request.stop == ("x",)
    assert request.params == GenerateParams(5, 0.0, 7, None, 0.5)
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "max_completion_tokens": 3}
    parsed = parse_chat(json.dumps({**chat, "stream": True, "stream_options": {"include_usage": True}}).encode(), 9)
    assert parsed.messages == (Message("user", "a"),) and parsed.params.max_new_tokens == 3
    assert parsed.stream and parsed.include_usage and parsed.params.top_p is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_values_are_refused_naming_the_field(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError, match=f"^{field}: "):
        parse_completions(json.dumps({"prompt": "p", **extra}).encode(), LIMIT)
    assert error_document(400, f"{field}: nope")["error"]["param"] == field


@pytest.mark.parametrize(
    ("parse", "document", "field"),
    [
        (parse_generate, {"prompt": "ab\ud800"}, "prompt: "),
        (parse_completions, {"prompt": ["\udc00"]}, "prompt: "),
        (parse_chat, {"messages": [{"role": "user", "content": "x\ud800"}]}, "messages[0].content: "),
        (parse_completions, {"prompt": "ok", "stop": ["\ud83d"]}, "stop: "),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(
    parse: Callable[[bytes, int], object], document: dict[str, Any], field: str
) -> None:
    with pytest.raises(RequestError, match="not valid Unicode text") as caught:
        parse(json.dumps(document).encode(), LIMIT)
    assert str(caught.value).startswith(field)
    assert parse_completions(json.dumps({"prompt": "\ud83d\ude00"}).encode(), LIMIT).prompt == "\U0001f600"


def test_ignored_fields_do_not_change_the_request() -> None:
    plain = parse_completions(b'{"prompt": "p"}', LIMIT)
    assert parse_completions(b'{"prompt": "p", "user": "u", "n": 1, "logprobs": null}', LIMIT) == plain


def test_stop_sequences_cut_the_text_and_count_the_tokens_up_to_the_stop() -> None:
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode("hello world. more")
    output = finish(tokens, tokenizer.decode, tokenizer.eos_id, ["o w", "."])
    assert output.text == "hell" and output.finish_reason == "stop"
    assert output.completion_tokens == len("hello w") and "".join(output.pieces) == "hell"
    eos = finish([*tokens[:3], tokenizer.eos_id, 1], tokenizer.decode, tokenizer.eos_id, [])  # EOS ends it
    assert (eos.text, eos.finish_reason, eos.completion_tokens) == ("hel", "stop", 4)
    ended = finish([*tokens[:3], tokenizer.eos_id], tokenizer.decode, tokenizer.eos_id, [])
    assert (ended.text, ended.finish_reason, ended.completion_tokens) == ("hel", "stop", 4)


def test_a_stream_carries_whole_characters_and_the_whole_text() -> None:
    tokenizer = ByteTokenizer()
    tokens = [*tokenizer.encode("né €"), 0xFF]
    output = finish(tokens, tokenizer.decode, tokenizer.eos_id, [])
    assert "".join(output.pieces) == output.text and output.pieces[:4] == ("n", "é", " ", "€")


def test_chat_prompts_follow_the_checkpoint_template_or_chatml(tmp_path: Path) -> None:
    messages = [Message("system", "be brief"), Message("user", "hi")]
    assert default_chat_prompt(messages) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert load_chat_template(tmp_path) is None and render_chat(messages, None) == default_chat_prompt(messages)
    template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert render_chat(messages, load_chat_template(tmp_path)) == "[system]be brief[user]hi>"
    with pytest.raises(ValueError, match=r"^messages: no"):
        render_chat(messages, "{{ raise_exception('no') }}")


class StubEngine:
    """What OpenAI's routes use of an engine: `unready`, `tokenizer`, `stream` (here refusing or answering)."""

    def __init__(self, unready: str | None = None, error: Exception | None = None) -> None:
        self.unready, self.error, self.tokenizer = unready, error, ByteTokenizer()

    def stream(self, prompt_ids: list[int], params: GenerateParams, cancelled: object = None) -> TokenStream:
        if self.error is not None:
            raise self.error
        stream = TokenStream()
        stream.begin(1, 1)
        for token in self.tokenizer.encode("ok!"):
            stream.put(token)
        stream.end()
        return stream


@pytest.mark.parametrize(
    ("engine", "status", "kind", "retry_after"),
    [
        (StubEngine(error=QueueFull("the queue is full")), 429, "rate_limit_error", "1"),
        (StubEngine(unready="no placement applied yet"), 503, "service_unavailable_error", None),
        (StubEngine(error=Stopping("stopping")), 503, "service_unavailable_error", None),
    ],
)
def test_refusals_are_openai_errors_with_their_status(
    engine: StubEngine, status: int, kind: str, retry_after: str | None
) -> None:
    routes = openai_routes(cast(GroupEngine, engine), LIMIT, "m", None)
    with pytest.raises(HttpError) as refused:
        routes[("POST", "/v1/completions")](b'{"prompt": "p"}')
    assert refused.value.status == status and refused.value.headers.get("Retry-After") == retry_after
    assert error_body("/v1/completions", status, str(refused.value))["error"]["type"] == kind


def test_routes_answer_documents_and_streams() -> None:
    routes = openai_routes(cast(GroupEngine, StubEngine()), LIMIT, "m", None)
    status, document = cast(tuple[int, dict[str, Any]], routes[("POST", "/v1/completions")](b'{"prompt": "p"}'))
    assert status == 200 and document["choices"][0]["text"] == "ok!" and document["usage"]["prompt_tokens"] == 1
    stream = routes[("POST", "/v1/chat/completions")](
        b'{"messages": [{"role": "user", "content": "p"}], "stream": true, "stream_options": {"include_usage": true}}'
    )
    assert isinstance(stream, Stream)
    events = list(stream.events)
    assert events[-1] == b"data: [DONE]\n\n" and all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "ok!"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


@settings(max_examples=150, deadline=None)
@given(bodies)
def test_any_body_gets_an_answer_or_a_4xx_from_the_routes(document: dict[str, Any]) -> None:
    routes = openai_routes(cast(GroupEngine, StubEngine()), LIMIT, "m", None)
    for path in ("/v1/completions", "/v1/chat/completions"):
        try:
            answer = routes[("POST", path)](json.dumps(document).encode())
        except HttpError as error:
            assert 400 <= error.status < 500, error
        except ValueError as error:  # the HTTP layer answers 400
            assert str(error), error
        else:
            assert isinstance(answer, Stream) or answer[0] == 200
