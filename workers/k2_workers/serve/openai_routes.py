"""OpenAI's routes on rank 0 of a group, as functions of its engine: `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream`) and `GET /v1/models`.

A stream sends each token's text as the engine decodes it (`TokenStream`), and a document is the concatenation of the
same pieces. The request stops decoding once its completion ended: EOS, `max_tokens`, a stop sequence, or a client
that went away (queued, it leaves the queue; decoding, its row leaves the batch at the next step).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from http import HTTPStatus
from typing import Any

from k2_workers.serve.chat import render_chat
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.http_routes import CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH, HttpError, Route, Stream
from k2_workers.serve.openai_request import OpenAIRequest, parse_chat, parse_completions
from k2_workers.serve.openai_response import (
    CompletionText,
    StreamError,
    chat_document,
    chat_events,
    completion_document,
    completion_events,
    text_pieces,
)
from k2_workers.serve.rank_routes import open_stream, read_tokens

log = logging.getLogger(__name__)


def openai_routes(
    engine: GroupEngine, max_new_tokens_limit: int, model: str, chat_template: str | None
) -> dict[tuple[str, str], Route]:
    created = int(time.time())
    tokenizer = engine.tokenizer

    def run(request: OpenAIRequest, prompt: str, chat: bool) -> tuple[int, dict[str, Any]] | Stream:
        if request.model is not None and request.model != model:
            raise HttpError(HTTPStatus.NOT_FOUND, f"model: {request.model!r} is not served here; {model!r} is")
        prompt_ids = tokenizer.encode(prompt)
        tokens = read_tokens(open_stream(engine, prompt_ids, request.params))
        text = CompletionText(tokenizer.decode, tokenizer.eos_id, request.stop)
        if request.stream:
            events = chat_events if chat else completion_events
            return Stream(events(model, len(prompt_ids), stream_pieces(tokens, text), text, request.include_usage))
        for _ in text_pieces(tokens, text):
            pass
        document = chat_document if chat else completion_document
        return HTTPStatus.OK, document(model, len(prompt_ids), text.output())

    def completions(body: bytes) -> tuple[int, dict[str, Any]] | Stream:
        request = parse_completions(body, max_new_tokens_limit)
        assert request.prompt is not None
        return run(request, request.prompt, chat=False)

    def chat_completions(body: bytes) -> tuple[int, dict[str, Any]] | Stream:
        request = parse_chat(body, max_new_tokens_limit)
        bos, eos = tokenizer.decode([tokenizer.bos_id]), tokenizer.decode([tokenizer.eos_id])
        return run(request, render_chat(request.messages, chat_template, bos, eos), chat=True)

    def models(_: bytes) -> tuple[int, dict[str, Any]]:
        entry = {"id": model, "object": "model", "created": created, "owned_by": "k2"}
        return HTTPStatus.OK, {"object": "list", "data": [entry]}

    return {
        ("POST", COMPLETIONS_PATH): completions,
        ("POST", CHAT_PATH): chat_completions,
        ("GET", MODELS_PATH): models,
    }


def stream_pieces(tokens: Iterator[int], text: CompletionText) -> Generator[str, None, None]:
    """`text_pieces`, with the errors met after the stream began as `StreamError`s (an error event)."""
    try:
        yield from text_pieces(tokens, text)
    except HttpError as error:
        raise StreamError(error.status, str(error)) from None
    except Exception as error:
        log.exception("a streamed request failed")
        raise StreamError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {error}") from None
