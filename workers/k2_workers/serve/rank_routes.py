"""The HTTP routes of a serving rank, as functions of its engine (no sockets here).

Every rank: `GET /healthz` (the readiness probe). Rank 0 also: `POST /v1/generate` and `GET /v1/placement` (and
OpenAI's routes, `openai_routes`, built on `complete`). A
generate request meeting a full queue gets 429 with `Retry-After`, one past its deadline 504; while the rank cannot
serve (no placement yet, a broken group, stopping) /healthz and generate answer 503.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from k2_api.contract import HttpPaths
from k2_workers.serve.endpoints import GENERATE_PATH, PLACEMENT_PATH, HttpError, Route, client_gone
from k2_workers.serve.engine import Completion, GroupBroken, GroupEngine
from k2_workers.serve.request import GenerateParams, parse_generate
from k2_workers.serve.scheduler import Cancelled, DeadlineExceeded, QueueFull, Stopping

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
    """`engine.generate`, its refusals as HTTP errors: 503 while unready or stopping, 429 with Retry-After on a full
    queue, 504 past the deadline. A request whose client disconnects while it is queued leaves the queue."""
    if (reason := engine.unready) is not None:
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, reason)
    try:
        return engine.generate(prompt_ids, params, client_gone)
    except QueueFull as error:
        raise HttpError(HTTPStatus.TOO_MANY_REQUESTS, str(error), {"Retry-After": str(RETRY_AFTER_S)}) from None
    except DeadlineExceeded as error:
        raise HttpError(HTTPStatus.GATEWAY_TIMEOUT, str(error)) from None
    except (Stopping, Cancelled) as error:  # nobody reads the answer to a cancelled request
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
    except RuntimeError as error:
        if isinstance(error.__cause__, GroupBroken):  # queued on a group that broke: it never ran
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, str(error.__cause__)) from None
        raise
