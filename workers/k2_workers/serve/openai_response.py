"""OpenAI's answers from a decoded completion: stop sequences, usage, the JSON documents, server-sent event chunks and
the error JSON. Pure: no torch, no sockets.

A completion is cut at the earliest of its stop sequences (the stop itself left out, `finish_reason: "stop"`, and
`completion_tokens` counts the tokens decoded up to the one that completed the stop), after EOS (`"stop"`, EOS
counted, not shown), or at `max_tokens` (`"length"`). A stream carries the same text in one chunk per token (a
token that ends inside a UTF-8 character waits for the next), so the concatenated chunks equal the whole text.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

DONE = b"data: [DONE]\n\n"
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


@dataclass(frozen=True)
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    pieces: tuple[str, ...]  # the text, token by token, for a stream


def finish(tokens: Sequence[int], decode: Callable[[list[int]], str], eos_id: int, stops: Sequence[str]) -> Output:
    """The completion of `tokens` (as decoded, cut after EOS) with its stop sequences applied."""
    shown = list(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)
    text = decode(shown)
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
        count = next(k for k in range(1, len(shown) + 1) if any(s in decode(shown[:k]) for s in stops))
        return Output(text, count, "stop", _pieces(shown[:count], decode, text))
    reason = "stop" if len(shown) < len(tokens) else "length"
    return Output(text, len(tokens), reason, _pieces(shown, decode, text))


def _pieces(tokens: list[int], decode: Callable[[list[int]], str], text: str) -> tuple[str, ...]:
    """`text` split at the token boundaries where the decoded prefix is a prefix of it."""
    pieces, sent = [], 0
    for k in range(1, len(tokens) + 1):
        prefix = decode(tokens[:k])
        if len(prefix) > sent and text.startswith(prefix) and not prefix.endswith("\ufffd"):
            pieces.append(text[sent : len(prefix)])
            sent = len(prefix)
    if sent < len(text):
        pieces.append(text[sent:])
    return tuple(pieces)


def usage(prompt_tokens: int, output: Output) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": prompt_tokens + output.completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_document(model: str, prompt_tokens: int, output: Output) -> dict[str, Any]:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": output.text, "finish_reason": output.finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, output),
    }


def chat_document(model: str, prompt_tokens: int, output: Output) -> dict[str, Any]:
    message = {"role": "assistant", "content": output.text}
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": output.finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, output),
    }


def completion_events(model: str, prompt_tokens: int, output: Output, include_usage: bool) -> Iterator[bytes]:
    """The server-sent events of a streamed completion, `[DONE]` last."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model}
    for piece in output.pieces:
        yield event({**head, "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]})
    last = {"index": 0, "text": "", "finish_reason": output.finish_reason, "logprobs": None}
    yield event({**head, "choices": [last]})
    if include_usage:
        yield event({**head, "choices": [], "usage": usage(prompt_tokens, output)})
    yield DONE


def chat_events(model: str, prompt_tokens: int, output: Output, include_usage: bool) -> Iterator[bytes]:
    """The server-sent events of a streamed chat completion: the role first, then the content, `[DONE]` last."""
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}

    yield event(choice({"role": "assistant", "content": ""}))
    for piece in output.pieces:
        yield event(choice({"content": piece}))
    yield event(choice({}, output.finish_reason))
    if include_usage:
        yield event({**head, "choices": [], "usage": usage(prompt_tokens, output)})
    yield DONE


def event(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def error_document(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error JSON; `param` is the field the message starts with (`"top_p: ..."`), when it does."""
    match = _FIELD.match(message)
    param = match.group(1) if match and match.group(1) not in ("body", "prompt_tokens") else None
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status == HTTPStatus.NOT_FOUND:
        kind, code = "invalid_request_error", "model_not_found" if message.startswith("model:") else "not_found"
    elif status < 500:
        kind, code = "invalid_request_error", None
    elif status == HTTPStatus.SERVICE_UNAVAILABLE:
        kind, code = "service_unavailable_error", None
    else:
        kind, code = "server_error", None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
