"""HTTP endpoints of a serving rank and of the frontend (stdlib `http.server`, one thread per connection).

Rank 0 of a group: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, our `POST /v1/generate`,
`GET /v1/placement`, `GET /healthz`. Other ranks: `GET /healthz` only (the readiness probe). A bad request gets 400,
an unready rank 503, an unexpected failure 500; the server itself never stops on a bad request. Errors on our own
paths (`LEGACY_PATHS`) are `{"error": message}`, on every other path OpenAI's error JSON. A route answers a JSON
document, or a `Stream` of server-sent events, written with chunked transfer encoding.

The edge is bounded (`HttpLimits`): a body larger than `max_body_bytes` gets 413, and a missing-body length that is
not a non-negative integer (or a chunked body) 400; either way the connection is closed, so an unread body is never
read as the next request. A client that sends nothing for `socket_timeout_s` is disconnected (slowloris), and at
most `max_connections` connections are served at once: one more gets 503 and is closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from k2_api.contract import HttpPaths
from k2_workers.serve.openai_response import error_document

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
GENERATE_PATH = "/v1/generate"  # rank 0 and the frontend
PLACEMENT_PATH = "/v1/placement"  # rank 0
COMPLETIONS_PATH = "/v1/completions"  # OpenAI's, on rank 0 and the frontend
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

LEGACY_PATHS = frozenset({GENERATE_PATH, PLACEMENT_PATH, HttpPaths.HEALTHZ})  # errors as {"error": message}


@dataclass(frozen=True)
class Stream:
    """A 200 answer sent as server-sent events, each item as one chunk when it comes (whole `data: ...\n\n`
    events, or pieces of them relayed from a group); `events` is closed when the answer ends or its client left."""

    events: Iterable[bytes]


Route = Callable[[bytes], "tuple[int, dict[str, Any]] | Stream"]  # body -> (status, JSON document) or a stream

LINGER_S = 1.0  # how long a closing connection discards what the client still sends
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = MAX_BODY_BYTES
    socket_timeout_s: float = 30.0  # longest silence from a client, while it sends a request or between requests
    max_connections: int = 256  # connections (and so handler threads) at once


class HttpError(Exception):
    """An answer other than 200: `status`, `{"error": message}` and extra `headers` (e.g. Retry-After)."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        headers: dict[str, str] | None = None,
        document: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.document = document  # the answer as is (an upstream's error passed on), instead of one from `message`


_serving = threading.local()  # the connection of the request the current handler thread serves


def client_gone() -> bool:
    """Whether the client of the request this thread serves has closed its connection (False outside a request):
    a route's way to notice a caller that went away while it waits."""
    connection: socket.socket | None = getattr(_serving, "connection", None)
    if connection is None:
        return False
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error JSON of `path`: ours on LEGACY_PATHS, OpenAI's elsewhere."""
    return {"error": message} if path in LEGACY_PATHS else error_document(status, message)


def body_length(content_length: str | None, transfer_encoding: str | None, limit: int) -> int:
    """The body's length from its headers; HttpError for a chunked, malformed, negative or too large one."""
    if transfer_encoding is not None:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "body: send Content-Length, not Transfer-Encoding")
    if content_length is None:
        return 0
    text = content_length.strip()
    if not text.isdigit():  # rejects "-1", "+5", "1e3", "": int() would take some of them
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length: not a non-negative integer: {content_length!r}")
    length = int(text)
    if length > limit:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: larger than {limit} bytes")
    return length


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; counts the requests in progress for `drain`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._in_progress = 0
        self._idle = threading.Condition()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that resets or times out its connection is routine: logged at debug, not as a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("connection from %s ended: %s", client_address, error)
        else:
            log.exception("request from %s failed", client_address)

    def begin_request(self) -> None:
        with self._idle:
            self._in_progress += 1

    def end_request(self) -> None:
        with self._idle:
            self._in_progress -= 1
            self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in progress (after `shutdown`, which stops taking new connections)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_progress == 0, timeout_s)


def serve_routes(
    routes: dict[tuple[str, str], Route], host: str, port: int, limits: HttpLimits = HttpLimits()
) -> BoundedHTTPServer:
    """Start serving `{(method, path): route}` from a daemon thread; `server.shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.socket_timeout_s  # applied to the socket by StreamRequestHandler.setup
        server: BoundedHTTPServer

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            self.server.begin_request()
            _serving.connection = self.connection
            try:
                self._answer(method)
            finally:
                _serving.connection = None
                self.server.end_request()

        def _answer(self, method: str) -> None:
            headers: dict[str, str] = {}
            path = self.path.split("?", 1)[0]
            try:
                route = routes.get((method, path))
                length = body_length(
                    self.headers.get("Content-Length"), self.headers.get("Transfer-Encoding"), limits.max_body_bytes
                )
                body = self.rfile.read(length) if length else b""
                if len(body) < length:
                    raise HttpError(HTTPStatus.BAD_REQUEST, "body: shorter than its Content-Length")
                if route is None:
                    raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {self.path}")
                answer = route(body)
                if isinstance(answer, Stream):
                    self._stream(answer)
                    return
                status, document = answer
            except (TimeoutError, ConnectionError):  # the client went silent or away mid-body
                self.close_connection = True
                return
            except HttpError as error:
                status, headers = error.status, error.headers
                document = error.document or error_body(path, status, str(error))
                if status in (HTTPStatus.BAD_REQUEST, HTTPStatus.LENGTH_REQUIRED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                    self.close_connection = True  # the body may be unread: it must not be taken for a request
            except ValueError as error:
                status, document = HTTPStatus.BAD_REQUEST, error_body(path, HTTPStatus.BAD_REQUEST, str(error))
            except Exception as error:
                log.exception("request %s %s failed", method, self.path)
                status = HTTPStatus.INTERNAL_SERVER_ERROR
                document = error_body(path, status, f"internal error: {error}")
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            if self.close_connection:
                self._linger()

        def _stream(self, stream: Stream) -> None:
            """Send the events as they come, one chunk each; a client gone midway ends it (and the connection)."""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for chunk in stream.events:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (ConnectionError, TimeoutError):
                self.close_connection = True
            finally:  # a client gone midway: the events' source learns it now (a request stops decoding)
                close = getattr(stream.events, "close", None)
                if close is not None:
                    close()

        def _linger(self) -> None:
            """Half-close, then discard what the client still sends for a moment: closing with unread bytes would
            reset the connection, and the client could lose the answer."""
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(LINGER_S)
                received = 0
                while received <= limits.max_body_bytes and (chunk := self.connection.recv(1 << 16)):
                    received += len(chunk)
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = BoundedHTTPServer((host, port), Handler, limits.max_connections)
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server
