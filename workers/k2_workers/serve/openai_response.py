"""OpenAI's answers from a completion's tokens: stop sequences, usage, the JSON documents, server-sent event chunks and
the error JSON. Pure: no torch, no sockets.

`CompletionText` takes the tokens one at a time, as they are decoded, and gives back the text that is final so far:
a token that ends inside a UTF-8 character waits for the next, and so does a tail that may be the start of a stop
sequence. A completion ends at EOS (`finish_reason: "stop"`, EOS counted, not shown), once a stop sequence appears
(the text is cut where it starts, `"stop"`, `completion_tokens` counts the tokens decoded up to the one that
completed it), or when the tokens run out (`"length"`). A stream sends the pieces as they come, and a document their
concatenation, so both carry the same text.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

DONE = b"data: [DONE]\n\n"
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
_INCOMPLETE = "\ufffd"  # what a decoder shows for the bytes of a character not complete yet


@dataclass(frozen=True)
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    pieces: tuple[str, ...] = ()  # the text as a stream sent it


class CompletionText:
    """The text of one completion, built token by token: `push` returns the new final text (maybe ""), `done` turns
    true at EOS or a stop sequence, `rest` returns what was held back once no token follows, `output` the whole."""

    def __init__(self, decode: Callable[[list[int]], str], eos_id: int, stops: Sequence[str]) -> None:
        self._decode, self._eos_id, self._stops = decode, eos_id, tuple(stops)
        self._shown: list[int] = []
        self._text = ""  # the text so far, cut at a stop sequence once one appeared
        self._sent: list[str] = []
        self._sent_chars = 0
        self.tokens = 0
        self.done = False

    def push(self, token: int) -> str:
        assert not self.done, "a completion takes no token after its end"
        self.tokens += 1
        if token == self._eos_id:
            self.done = True
            return ""
        self._shown.append(token)
        self._text = self._decode(self._shown)
        cuts = [i for i in (self._text.find(s) for s in self._stops) if i >= 0]
        if cuts:
            self._text, self.done = self._text[: min(cuts)], True
            return ""
        final = self._text.rstrip(_INCOMPLETE)
        return self._send(final[: len(final) - self._stop_prefix(final)])

    def rest(self) -> str:
        """The text held back so far: all of it is final once the completion ended."""
        return self._send(self._text)

    def output(self) -> Output:
        reason = "stop" if self.done else "length"
        return Output("".join(self._sent), self.tokens, reason, tuple(self._sent))

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest end of `text` that a stop sequence starts with."""
        return max((k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _send(self, final: str) -> str:
        sent = "".join(self._sent)
        if len(final) <= self._sent_chars or not final.startswith(sent):
            return ""
        piece = final[self._sent_chars :]
        self._sent.append(piece)
        self._sent_chars = len(final)
        return piece


def text_pieces(tokens: Iterable[int], text: CompletionText) -> Generator[str, None, None]:
    """The pieces of `text` as `tokens` arrive, until the completion ends (the token iterator is closed then)."""
    iterator = iter(tokens)
    with contextlib.closing(iterator) if isinstance(iterator, Generator) else contextlib.nullcontext():
        for token in iterator:
            if piece := text.push(token):
                yield piece
            if text.done:
                break
    if piece := text.rest():
        yield piece


def finish(tokens: Sequence[int], decode: Callable[[list[int]], str], eos_id: int, stops: Sequence[str]) -> Output:
    """The completion of `tokens` (all decoded already)."""
    text = CompletionText(decode, eos_id, stops)
    for _ in text_pieces(tokens, text):
        pass
    return text.output()


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


def completion_events(
    model: str, prompt_tokens: int, pieces: Iterator[str], text: CompletionText, include_usage: bool
) -> Iterator[bytes]:
    """The server-sent events of a streamed completion, one per piece as it comes, `[DONE]` last."""
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model}

    def choice(piece: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": piece, "finish_reason": finish_reason, "logprobs": None}]}

    return _events(choice, (), pieces, text, prompt_tokens, include_usage, head)


def chat_events(
    model: str, prompt_tokens: int, pieces: Iterator[str], text: CompletionText, include_usage: bool
) -> Iterator[bytes]:
    """The server-sent events of a streamed chat completion: the role first, then the content, `[DONE]` last."""
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def delta(piece: str, finish_reason: str | None = None) -> dict[str, Any]:
        content = {"content": piece} if finish_reason is None else {}
        return {**head, "choices": [{"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}]}

    first = delta("")
    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return _events(delta, (first,), pieces, text, prompt_tokens, include_usage, head)


def _events(
    chunk: Callable[[str, str | None], dict[str, Any]],
    before: tuple[dict[str, Any], ...],
    pieces: Iterator[str],
    text: CompletionText,
    prompt_tokens: int,
    include_usage: bool,
    head: dict[str, Any],
) -> Generator[bytes, None, None]:
    """`before`, a chunk per piece, the last chunk with the finish reason, usage if asked, `[DONE]`. An error while
    the tokens come (headers sent already) is an event with OpenAI's error JSON, then `[DONE]`."""
    for document in before:
        yield event(document)
    with contextlib.closing(pieces) if isinstance(pieces, Generator) else contextlib.nullcontext():
        try:
            for piece in pieces:
                yield event(chunk(piece, None))
        except StreamError as error:
            yield event(error_document(error.status, str(error)))
            yield DONE
            return
    output = text.output()
    yield event(chunk("", output.finish_reason))
    if include_usage:
        yield event({**head, "choices": [], "usage": usage(prompt_tokens, output)})
    yield DONE


class StreamError(Exception):
    """A request that failed after its stream began: `status` is what its answer would have had."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
