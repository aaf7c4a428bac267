"""The frontend: one HTTP endpoint that routes generate requests across the serving groups.

Round-robin over the groups' rank-0 URLs. A request moves on to the next group only when its group did not take it,
so no two groups ever run it: the connection was refused, not made within `CONNECT_TIMEOUT_S` or failed before the
request was sent, the group answered 503 (not ready, stopping, broken before it answered) or 429 (its queue is full), or
the group closed the connection without an answer (it died: its work is lost and cannot finish). Anything else is
the answer: a 4xx (every group would say the same), a 500 or 504 of a group that ran the request, or our 504 when a
group that took the request does not answer within `timeout_s` (it may still be decoding; running it again elsewhere
would double the work). When no group took it, the request waits for one (`group_wait`: more rounds over the groups,
with pauses, for up to `--group-wait-s`), since a group is often only briefly away (a rolling update, a gang
restart); 429 at once when every group's queue is full, and 503 when no group took it within the wait.
Routed paths: our `POST /v1/generate` and OpenAI's `POST /v1/completions` and `POST /v1/chat/completions`; `GET
/v1/models` asks the groups in the same order. A group's stream is relayed as it comes (each event when the group
sends it, that is as its tokens are decoded); a client that goes away closes the group's connection, which cancels
the request there.
The frontend only proxies HTTP: this module and everything it imports stay free of torch, so the frontend process
starts fast and small (`benchmarks/frontend_start.py`).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from k2_api.contract import HttpPaths
from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.group_wait import GroupWait
from k2_workers.serve.grpc_start import start_frontend_grpc
from k2_workers.serve.http_routes import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    GENERATE_PATH,
    MODELS_PATH,
    HttpError,
    HttpLimits,
    Route,
    Stream,
    client_gone,
)
from k2_workers.serve.scheduler import CANCEL_POLL_S, DEFAULT_REQUEST_TIMEOUT_S

log = logging.getLogger(__name__)

DEFAULT_UPSTREAM_TIMEOUT_S = DEFAULT_REQUEST_TIMEOUT_S + 30  # past the rank's own deadline, which answers 504 first
# A group whose address answers no handshake (a dead pod's address, a peer's stale neighbour entry) is passed over
# after this, rather than after the upstream timeout: no request was sent, so the next group may take it.
CONNECT_TIMEOUT_S = 3.0
DRAIN_GRACE_S = 10.0  # how long a stopping frontend lets its gRPC calls in flight finish
RELAY_BYTES = 1 << 16  # at most this much of a stream read at once (a chunk of the group's is relayed whole)
NOT_TAKEN = frozenset({HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS})  # the group did not run it


@dataclass
class Upstream:
    """A group's answer, its body not read yet: `read` it, or `relay` it (a stream); either closes the connection."""

    endpoint: str
    status: int
    content_type: str
    response: http.client.HTTPResponse
    connection: http.client.HTTPConnection

    def read(self) -> bytes:
        try:
            return self.response.read()
        finally:
            self.connection.close()

    def relay(self) -> Generator[bytes, None, None]:
        """The body piece by piece as it arrives. A thread reads the group's connection, so that this one can notice
        meanwhile that our client went away (`client_gone`): the group's connection is then shut, which cancels the
        request there. A group that breaks the stream midway ends it with a ConnectionError."""
        pieces: queue.SimpleQueue[bytes | Exception | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                while piece := self.response.read1(RELAY_BYTES):
                    pieces.put(piece)
                pieces.put(None)
            except Exception as error:  # shut by us, a timeout, or the group gone
                pieces.put(error)

        threading.Thread(target=read, name="relay", daemon=True).start()
        try:
            while True:
                try:
                    item = pieces.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if client_gone():
                        return
                    continue
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise ConnectionError(f"{self.endpoint}: the stream broke: {item}")
                yield item
        finally:
            if self.connection.sock is not None:
                with contextlib.suppress(OSError):
                    self.connection.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
            self.connection.close()


class GroupRouter:
    """Forwards a request to one group after another, starting at the next in round-robin order, while the groups
    tried did not take it; when none did, again after a pause (`wait`)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S,
        wait: GroupWait | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        if not endpoints:
            raise ValueError("endpoints: the frontend needs at least one group endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._timeout_s = timeout_s
        self._connect_s = connect_timeout_s
        self._wait = wait or GroupWait()

    def forward(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The answer of the first group that takes the request, with `"group"` added when it succeeded."""
        upstream = self.open(path, body)
        document = json.loads(upstream.read() or b"{}")
        return upstream.status, {**document, "group": upstream.endpoint} if upstream.status == 200 else document

    def proxy(self, path: str, body: bytes | None) -> tuple[int, dict[str, Any]] | Stream:
        """An OpenAI request's answer as the group sent it: a JSON document, or its events as they come."""
        upstream = self.open(path, body)
        if upstream.status == HTTPStatus.OK and upstream.content_type.startswith("text/event-stream"):
            return Stream(upstream.relay())
        payload = upstream.read()
        if upstream.status != HTTPStatus.OK:  # the group's OpenAI error JSON, passed on as it is
            raise HttpError(HTTPStatus(upstream.status), "upstream error", document=json.loads(payload or b"{}"))
        return upstream.status, json.loads(payload)

    def open(self, path: str, body: bytes | None) -> Upstream:
        """The answer of the first group that takes the request (POST `body`, or GET when None), over as many
        rounds as the wait allows; at once 429 when every group's queue is full."""
        refusals: list[tuple[str, str, int | None]] = []
        started, rounds = time.monotonic(), 0
        for _ in self._wait.rounds():
            rounds += 1
            upstream, refusals = self._one_round(path, body)
            if upstream is not None:
                return upstream
            if {status for _, _, status in refusals} == {HTTPStatus.TOO_MANY_REQUESTS}:
                break
        full = {status for _, _, status in refusals} == {HTTPStatus.TOO_MANY_REQUESTS}
        status = HTTPStatus.TOO_MANY_REQUESTS if full else HTTPStatus.SERVICE_UNAVAILABLE
        headers = {"Retry-After": "1"} if full else {}
        reasons = "; ".join(f"{endpoint}: {reason}" for endpoint, reason, _ in refusals)
        waited = f"{rounds} round{'s' if rounds > 1 else ''} in {time.monotonic() - started:.1f} s"
        log.warning("no group took a request (%s): %s", waited, reasons)
        raise HttpError(status, f"no group could serve the request ({waited}; the last: {reasons})", headers)

    def _one_round(self, path: str, body: bytes | None) -> tuple[Upstream | None, list[tuple[str, str, int | None]]]:
        """The first group's answer that took the request, or why each group did not (endpoint, reason, status)."""
        with self._lock:
            start = next(self._next)
        refusals: list[tuple[str, str, int | None]] = []
        for offset in range(len(self.endpoints)):
            endpoint = self.endpoints[(start + offset) % len(self.endpoints)]
            url = urllib.parse.urlsplit(endpoint)
            connection = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=self._connect_s)
            method = "GET" if body is None else "POST"
            try:
                connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(self._timeout_s)
                connection.request(method, url.path + path, body, {"Content-Type": "application/json"})
            except OSError as error:  # before the request was sent: refused, unresolvable, unreachable
                connection.close()
                reason = f"no connection within {self._connect_s}s" if isinstance(error, TimeoutError) else str(error)
                refusals.append((endpoint, reason, None))
                continue
            try:
                response = connection.getresponse()
            except TimeoutError as error:  # taken, and still running there: never run it twice
                connection.close()
                message = f"{endpoint}: no answer within {self._timeout_s}s"
                raise HttpError(HTTPStatus.GATEWAY_TIMEOUT, message) from error
            except (http.client.RemoteDisconnected, ConnectionError) as error:  # the group died with it
                connection.close()
                refusals.append((endpoint, f"closed without an answer ({error})", None))
                continue
            content_type = response.headers.get("Content-Type", "")
            upstream = Upstream(endpoint, response.status, content_type, response, connection)
            if response.status not in NOT_TAKEN:
                return upstream, refusals
            upstream.read()
            refusals.append((endpoint, f"HTTP {response.status}", response.status))
        return None, refusals


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
    endpoints: Sequence[str],
    host: str,
    port: int,
    stop: threading.Event,
    limits: HttpLimits | None = None,
    grpc: tuple[int, Sequence[str]] | None = None,
    wait: GroupWait | None = None,
) -> int:
    """Serve the frontend on host:port until `stop` is set, and gRPC when `grpc` = (port, the groups' host:port)."""
    router = GroupRouter([e for e in endpoints if e.strip()], wait=wait)
    server = serve_routes(frontend_routes(router), host, port, limits or HttpLimits())
    log.info("frontend on %s:%d routing across %d groups", host, server.server_port, len(router.endpoints))
    grpc_server = None if grpc is None else start_frontend_grpc(host, *grpc, wait=wait)
    stop.wait()
    if grpc_server is not None:
        grpc_server.drain()
        grpc_server.stop(DRAIN_GRACE_S)
    server.shutdown()
    return 0
