"""The HTTP routes of a serving rank, as functions of its engine (no sockets here).

Every rank: `GET /healthz` (the readiness probe). Rank 0 also: `POST /v1/generate` and `GET /v1/placement` (and
OpenAI's routes, `openai_routes`, built on `open_stream` and `read_tokens`). A
generate request meeting a full queue gets 429 with `Retry-After`, one past its deadline 504; while the rank cannot
serve (no placement yet, a broken group, stopping) /healthz and generate answer 503.
"""

from __future__ import annotations

from collections.abc import Generator
from http import HTTPStatus
from typing import Any

from k2_api.contract import HttpPaths
from k2_workers.serve.engine import Completion, GroupBroken, GroupEngine
from k2_workers.serve.http_routes import GENERATE_PATH, PLACEMENT_PATH, HttpError, Route, client_gone
from k2_workers.serve.request import GenerateParams, parse_generate
from k2_workers.serve.scheduler import Cancelled, DeadlineExceeded, QueueFull, Stopping
from k2_workers.serve.token_stream import TokenStream

RETRY_AFTER_S = 1  # what a 429 (queue full) asks the client to wait


def rank_routes(engine: GroupEngine, max_new_tokens_limit: int) -> dict[tuple[str, str], Route]:
    def healthz(_: bytes) -> tuple[int, dict[str, Any]]:
        if (reason := engine.unready) is not None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, reason)
        return HTTPStatus.OK, {"status": "ok", "rank": engine.rank, "placementGeneration": engine.generation}

    def placement(_: bytes) -> tuple[int, dict[str, Any]]:
        current = engine.placement
        if current is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no placement applied yet")
        return HTTPStatus.OK, {
            "generation": current.generation,
            "ranks": current.num_ranks,
            "slotsPerRank": current.slots_per_rank,
            "layers": [t.table_RS.tolist() for t in current.tables],
            "ignoredFileError": engine.placement_error,
        }

    def generate(body: bytes) -> tuple[int, dict[str, Any]]:
        request = parse_generate(body, max_new_tokens_limit)
        if (reason := engine.unready) is not None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, reason)
        prompt_ids = engine.tokenizer.encode(request.prompt)
        completion = complete(engine, prompt_ids, request.params)
        return HTTPStatus.OK, {
            "text": engine.tokenizer.decode(completion.tokens),
            "tokens": completion.tokens,
            "promptTokens": len(prompt_ids),
            "placementGeneration": completion.placement_generation,
            "batchSize": completion.batch_size,
        }

    routes: dict[tuple[str, str], Route] = {("GET", HttpPaths.HEALTHZ): healthz}
    if engine.rank == 0:
        routes |= {("GET", PLACEMENT_PATH): placement, ("POST", GENERATE_PATH): generate}
    return routes


def complete(engine: GroupEngine, prompt_ids: list[int], params: GenerateParams) -> Completion:
    """`engine.generate`, its refusals as HTTP errors (`open_stream`, `read_tokens`)."""
    stream = open_stream(engine, prompt_ids, params)
    tokens = list(read_tokens(stream))
    return Completion(tokens, stream.batch_size, stream.placement_generation)


def open_stream(engine: GroupEngine, prompt_ids: list[int], params: GenerateParams) -> TokenStream:
    """`engine.stream` for this thread's HTTP client (a client that disconnects cancels it), its refusals as HTTP
    errors: 503 while unready or stopping, 429 with Retry-After on a full queue."""
    if (reason := engine.unready) is not None:
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, reason)
    try:
        return engine.stream(prompt_ids, params, client_gone)
    except Exception as error:
        if (refusal := http_error(error)) is None:
            raise
        raise refusal from None


def read_tokens(stream: TokenStream) -> Generator[int, None, None]:
    """The stream's tokens; its failures as HTTP errors: 504 past the deadline, 503 when cancelled or when the group
    broke before the request's answer (queued, or running when it broke). Closing it early cancels the request."""
    try:
        yield from stream
    except Exception as error:
        if (refusal := http_error(error)) is None:
            raise
        raise refusal from None


def http_error(error: Exception) -> HttpError | None:
    """The HTTP error that answers an engine's refusal or failure; None for any other error (a 400 or a 500)."""
    if isinstance(error, QueueFull):
        return HttpError(HTTPStatus.TOO_MANY_REQUESTS, str(error), {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, DeadlineExceeded):
        return HttpError(HTTPStatus.GATEWAY_TIMEOUT, str(error))
    if isinstance(error, Stopping | Cancelled):  # nobody reads the answer to a cancelled request
        return HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(error))
    if isinstance(error, RuntimeError) and isinstance(error.__cause__, GroupBroken):  # its group broke: no answer
        return HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(error.__cause__))  # went out, another group may run it
    return None
