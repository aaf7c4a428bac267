"""The bodies of OpenAI's `POST /v1/completions` and `POST /v1/chat/completions`, parsed: pure, no torch, and every
error a `RequestError` whose message starts with the field it is about (`"top_p: ..."`).

Supported: `model` (checked by the route against the served name), `prompt` (a string, or a list of one string) or
`messages` (`role` and string `content`), `max_tokens` (chat also `max_completion_tokens`), `temperature` in [0, 2],
`top_p` in (0, 1], `seed`, `stop` (a string or up to four), `n` = 1, `stream` and `stream_options.include_usage`.
OpenAI fields we do not implement are refused with a 400 naming the field when honouring them would change the
result (`n` > 1, `best_of` > 1, `logprobs`, `top_logprobs`, `echo`, `suffix`, non-zero penalties, `logit_bias`,
`tools`, a `response_format` other than text), and ignored otherwise (`user`, `metadata`, `store`,
`parallel_tool_calls`, `service_tier`, `tool_choice` "none", null values). Any other field is a 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from k2_workers.serve.request import DEFAULT_MAX_NEW_TOKENS, GenerateParams, RequestError, check_text

MAX_STOP_SEQUENCES = 4
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**31 - 1
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

IGNORED = frozenset({"user", "metadata", "store", "parallel_tool_calls", "service_tier"})  # never change a result
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options"})


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class OpenAIRequest:
    """A completions request (`prompt` set) or a chat request (`messages` set)."""

    model: str | None
    params: GenerateParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    messages: tuple[Message, ...] = ()


def parse_completions(body: bytes, max_new_tokens_limit: int) -> OpenAIRequest:
    """The body of `POST /v1/completions`."""
    document = _document(body)
    _refuse_unsupported(document, COMMON | {"prompt", "best_of", "echo", "logprobs", "suffix"} | _PENALTIES)
    _refuse_if(document, "best_of", lambda v: v not in (None, 1), "only 1 is supported")
    _refuse_if(document, "echo", lambda v: v not in (None, False), "not supported")
    _refuse_if(document, "logprobs", lambda v: v is not None, "not supported")
    _refuse_if(document, "suffix", lambda v: v is not None, "not supported")
    prompt = document.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt: required, a non-empty string (or a list of exactly one)")
    return _common(document, max_new_tokens_limit, "max_tokens", prompt=check_text(prompt, "prompt"))


def parse_chat(body: bytes, max_new_tokens_limit: int) -> OpenAIRequest:
    """The body of `POST /v1/chat/completions`."""
    document = _document(body)
    chat_fields = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias", "tools"}
    _refuse_unsupported(document, COMMON | _PENALTIES | chat_fields | {"tool_choice", "response_format"})
    _refuse_if(document, "logprobs", lambda v: v not in (None, False), "not supported")
    _refuse_if(document, "top_logprobs", lambda v: v is not None, "not supported")
    _refuse_if(document, "tools", lambda v: v not in (None, []), "not supported")
    _refuse_if(document, "tool_choice", lambda v: v not in (None, "none"), "not supported")
    _refuse_if(
        document, "response_format", lambda v: v not in (None, {"type": "text"}), 'only {"type": "text"} is supported'
    )
    if document.get("max_tokens") is not None and document.get("max_completion_tokens") is not None:
        raise RequestError("max_completion_tokens: give it or max_tokens, not both")
    length_field = "max_completion_tokens" if document.get("max_completion_tokens") is not None else "max_tokens"
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: required, a non-empty list")
    parsed = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    return _common(document, max_new_tokens_limit, length_field, messages=parsed)


_PENALTIES = frozenset({"presence_penalty", "frequency_penalty", "logit_bias"})


def _document(body: bytes) -> dict[str, object]:
    try:
        document = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"body: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise RequestError("body: expected a JSON object")
    return document


def _refuse_unsupported(document: dict[str, object], known: frozenset[str]) -> None:
    unknown = sorted(set(document) - known - IGNORED)
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field")
    _refuse_if(document, "presence_penalty", lambda v: v not in (None, 0), "only 0 is supported")
    _refuse_if(document, "frequency_penalty", lambda v: v not in (None, 0), "only 0 is supported")
    _refuse_if(document, "logit_bias", lambda v: v not in (None, {}), "not supported")
    _refuse_if(document, "n", lambda v: v not in (None, 1) or isinstance(v, bool), "only n=1 is supported")


def _refuse_if(document: dict[str, object], field: str, refused: Callable[[object], bool], why: str) -> None:
    if field in document and refused(document[field]):
        raise RequestError(f"{field}: {why}")


def _message(value: object, where: str) -> Message:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected an object with role and content")
    role, content = value.get("role"), value.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise RequestError(f"{where}.role: one of {sorted(ROLES)}")
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        if not all(isinstance(t, str) for t in texts):
            raise RequestError(f"{where}.content: only text parts are supported")
        content = "".join(t for t in texts if isinstance(t, str))
    if not isinstance(content, str):
        raise RequestError(f"{where}.content: a string")
    return Message(role, check_text(content, f"{where}.content"))


def _common(
    document: dict[str, object],
    max_new_tokens_limit: int,
    length_field: str,
    prompt: str | None = None,
    messages: tuple[Message, ...] = (),
) -> OpenAIRequest:
    model = document.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model: a string")
    max_new = _integer(document, length_field, DEFAULT_MAX_NEW_TOKENS, 1, max_new_tokens_limit)
    temperature = _number(document, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    top_p = _number(document, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p: a number in (0, 1]")
    seed = _integer(document, "seed", 0, 0, MAX_SEED)
    stream = document.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream: a boolean")
    options = document.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError('stream_options: {"include_usage": bool}')
        include_usage = options.get("include_usage") is True
    params = GenerateParams(max_new, temperature, seed, None, None if top_p == 1 else top_p)
    return OpenAIRequest(
        model, params, _stop(document.get("stop")), bool(stream), include_usage, prompt=prompt, messages=messages
    )


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise RequestError(f"stop: a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them")
    return tuple(check_text(s, "stop") for s in stops)


def _integer(document: dict[str, object], field: str, default: int, low: int, high: int) -> int:
    value = document.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{field}: an integer in [{low}, {high}]")
    return value


def _number(document: dict[str, object], field: str, default: float, low: float, high: float) -> float:
    value = document.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{field}: a number in [{low}, {high}]")
    return float(value)
