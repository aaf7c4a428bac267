"""OpenAI's routes on rank 0 of a group, as functions of its engine: `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream`) and `GET /v1/models`.

The engine decodes a request's whole completion in its batch (static batching, the group in lockstep), so a stream
is sent once the completion is decoded: its first token comes as late as the last. A client that disconnects while
its request is queued takes it out of the queue (`complete`); once in a batch, the request runs to the batch's end.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

from k2_workers.serve.chat import render_chat
from k2_workers.serve.endpoints import CHAT_PATH, COMPLETIONS_PATH, MODELS_PATH, HttpError, Route, Stream
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.openai_request import OpenAIRequest, parse_chat, parse_completions
from k2_workers.serve.openai_response import (
    chat_document,
    chat_events,
    completion_document,
    completion_events,
    finish,
)
from k2_workers.serve.rank_routes import complete


def openai_routes(
    engine: GroupEngine, max_new_tokens_limit: int, model: str, chat_template: str | None
) -> dict[tuple[str, str], Route]:
    created = int(time.time())
    tokenizer = engine.tokenizer

    def run(request: OpenAIRequest, prompt: str, chat: bool) -> tuple[int, dict[str, Any]] | Stream:
        if request.model is not None and request.model != model:
            raise HttpError(HTTPStatus.NOT_FOUND, f"model: {request.model!r} is not served here; {model!r} is")
        prompt_ids = tokenizer.encode(prompt)
        completion = complete(engine, prompt_ids, request.params)
        output = finish(completion.tokens, tokenizer.decode, tokenizer.eos_id, request.stop)
        if request.stream:
            events = chat_events if chat else completion_events
            return Stream(events(model, len(prompt_ids), output, request.include_usage))
        document = chat_document if chat else completion_document
        return HTTPStatus.OK, document(model, len(prompt_ids), output)

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
