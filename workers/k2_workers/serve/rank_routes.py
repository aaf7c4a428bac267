"""The routes of a serving rank and of the frontend, as functions of their state (no sockets here)."""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from k2_workers.serve.endpoints import HttpError, Route
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.request_body import parse_generate


def rank_routes(engine: GroupEngine, max_new_tokens_limit: int) -> dict[tuple[str, str], Route]:
    def healthz(_: bytes) -> tuple[int, dict[str, Any]]:
        if engine.generation is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no placement applied yet")
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
        if engine.generation is None:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no placement applied yet")
        prompt_ids = engine.tokenizer.encode(request.prompt)
        completion = engine.generate(prompt_ids, request.params)
        return HTTPStatus.OK, {
            "text": engine.tokenizer.decode(completion.tokens),
            "tokens": completion.tokens,
            "promptTokens": len(prompt_ids),
            "placementGeneration": completion.placement_generation,
            "batchSize": completion.batch_size,
        }

    routes: dict[tuple[str, str], Route] = {("GET", "/healthz"): healthz}
    if engine.rank == 0:
        routes |= {("GET", "/v1/placement"): placement, ("POST", "/v1/generate"): generate}
    return routes


class GroupRouter:
    """The frontend's choice of group: round-robin, moving on to the next group when one is unreachable or
    answers 5xx, so a group that is down or rolling does not fail requests while another group serves."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 120.0) -> None:
        if not endpoints:
            raise ValueError("endpoints: the frontend needs at least one group endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def forward(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            start = next(self._next)
        failures = []
        for offset in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + offset) % len(self.endpoints)]
            request = urllib.request.Request(endpoint + path, data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    return response.status, {**json.loads(response.read()), "group": endpoint}
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the request itself is bad: every group would say the same
                    return error.code, json.loads(error.read() or b"{}")
                failures.append(f"{endpoint}: HTTP {error.code}")
            except (urllib.error.URLError, OSError) as error:
                failures.append(f"{endpoint}: {error}")
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no group could serve the request: " + "; ".join(failures))


def frontend_routes(router: GroupRouter) -> dict[tuple[str, str], Route]:
    def healthz(_: bytes) -> tuple[int, dict[str, Any]]:
        return HTTPStatus.OK, {"status": "ok", "groups": len(router.endpoints)}

    def generate(body: bytes) -> tuple[int, dict[str, Any]]:
        return router.forward("/v1/generate", body)

    return {("GET", "/healthz"): healthz, ("POST", "/v1/generate"): generate}
