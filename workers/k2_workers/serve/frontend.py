"""The frontend: one HTTP endpoint that routes generate requests across the serving groups.

Round-robin over the groups' rank-0 URLs. A request moves on to the next group only when its group did not take
it, so no two groups ever run it: the connection was refused (or failed before the request was sent), the group
answered 503 (not ready, stopping, broken before it ran) or 429 (its queue is full), or the group closed the
connection without an answer (it died: its work is lost and cannot finish). Anything else is the answer: a 4xx
(every group would say the same), a 500 or 504 of a group that ran the request, or our 504 when a group that took
the request does not answer within `timeout_s` (it may still be decoding; running it again elsewhere would double
the work). 503 (or 429 when every group's queue is full) only when no group took it.
Routed paths: our `POST /v1/generate` and OpenAI's `POST /v1/completions` and `POST /v1/chat/completions`; `GET
/v1/models` asks the groups in the same order. A group's stream is read whole, then passed on as the same events
(a group sends a stream only once its completion is decoded, so nothing is delayed by it).
The frontend only proxies HTTP: this module and everything it imports stay free of torch, so the frontend process
starts fast and small (`benchmarks/frontend_start.py`).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from k2_api.contract import HttpPaths
from k2_workers.serve.endpoints import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    GENERATE_PATH,
    MODELS_PATH,
    HttpError,
    HttpLimits,
    Route,
    Stream,
    serve_routes,
)
from k2_workers.serve.scheduler import DEFAULT_REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_UPSTREAM_TIMEOUT_S = DEFAULT_REQUEST_TIMEOUT_S + 30  # past the rank's own deadline, which answers 504 first
NOT_TAKEN = frozenset({HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS})  # the group did not run it


class GroupRouter:
    """Forwards a request to one group after another, starting at the next in round-robin order, while the groups
    tried did not take it."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("endpoints: the frontend needs at least one group endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def forward(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The answer of the first group that takes the request, with `"group"` added when it succeeded."""
        endpoint, status, payload, _ = self.send(path, body)
        document = json.loads(payload or b"{}")
        return status, {**document, "group": endpoint} if status == HTTPStatus.OK else document

    def proxy(self, path: str, body: bytes | None) -> tuple[int, dict[str, Any]] | Stream:
        """An OpenAI request's answer as the group sent it: a JSON document, or its events."""
        _, status, payload, content_type = self.send(path, body)
        if status == HTTPStatus.OK and content_type.startswith("text/event-stream"):
            return Stream([payload])
        if status != HTTPStatus.OK:  # the group's OpenAI error JSON, passed on as it is
            raise HttpError(HTTPStatus(status), "upstream error", document=json.loads(payload or b"{}"))
        return status, json.loads(payload)

    def send(self, path: str, body: bytes | None) -> tuple[str, int, bytes, str]:
        """(endpoint, status, body, content type) of the first group that takes the request (POST `body`, or GET
        when None)."""
        with self._lock:
            start = next(self._next)
        failures, statuses = [], []
        for offset in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + offset) % len(self.endpoints)]
            request = urllib.request.Request(endpoint + path, data=body, method="GET" if body is None else "POST")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                    return endpoint, response.status, response.read(), response.headers.get("Content-Type", "")
            except urllib.error.HTTPError as error:
                if error.code not in NOT_TAKEN:
                    return endpoint, error.code, error.read(), error.headers.get("Content-Type", "")
                failures.append(f"{endpoint}: HTTP {error.code}")
                statuses.append(error.code)
            except urllib.error.URLError as error:  # raised before the request was sent: refused, unresolvable
                failures.append(f"{endpoint}: {error.reason}")
            except TimeoutError as error:  # taken, and still running there: never run it twice
                raise HttpError(
                    HTTPStatus.GATEWAY_TIMEOUT, f"{endpoint}: no answer within {self._timeout_s}s"
                ) from error
            except (http.client.RemoteDisconnected, ConnectionError) as error:  # the group died with it
                failures.append(f"{endpoint}: closed without an answer ({error})")
        status = HTTPStatus.TOO_MANY_REQUESTS if statuses and set(statuses) == {429} else HTTPStatus.SERVICE_UNAVAILABLE
        headers = {"Retry-After": "1"} if status == HTTPStatus.TOO_MANY_REQUESTS else {}
        raise HttpError(status, "no group could serve the request: " + "; ".join(failures), headers)


def frontend_routes(router: GroupRouter) -> dict[tuple[str, str], Route]:
    def healthz(_: bytes) -> tuple[int, dict[str, Any]]:
        return HTTPStatus.OK, {"status": "ok", "groups": len(router.endpoints)}

    def generate(body: bytes) -> tuple[int, dict[str, Any]]:
        return router.forward(GENERATE_PATH, body)

    def openai(path: str, method: str) -> Route:
        return lambda body: router.proxy(path, body if method == "POST" else None)

    routes: dict[tuple[str, str], Route] = {("GET", HttpPaths.HEALTHZ): healthz, ("POST", GENERATE_PATH): generate}
    for method, path in (("POST", COMPLETIONS_PATH), ("POST", CHAT_PATH), ("GET", MODELS_PATH)):
        routes[(method, path)] = openai(path, method)
    return routes


def run_frontend(
    endpoints: Sequence[str], host: str, port: int, stop: threading.Event, limits: HttpLimits | None = None
) -> int:
    """Serve the frontend on host:port until `stop` is set."""
    router = GroupRouter([e for e in endpoints if e.strip()])
    server = serve_routes(frontend_routes(router), host, port, limits or HttpLimits())
    log.info("frontend on %s:%d routing across %d groups", host, server.server_port, len(router.endpoints))
    stop.wait()
    server.shutdown()
    return 0
