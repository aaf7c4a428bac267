"""The serving HTTP server as it was before uvicorn (issue 14): the standard library's `ThreadingHTTPServer`, one
thread per connection, kept here only as the baseline of `serving_apis.py` (the package serves with
`k2_workers.serve.endpoints`). Same routes, same limits where it had them (body size, socket timeout, connection
count); `client_gone()` is not wired (the benchmark's clients never leave).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from k2_workers.serve.http_routes import HttpError, HttpLimits, Route, Stream, body_length, error_body

log = logging.getLogger(__name__)

LINGER_S = 1.0  # how long a closing connection discards what the client still sends
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


def stdlib_body_length(content_length: str | None, transfer_encoding: str | None, limit: int) -> int:
    """`body_length`, a chunked body refused (this server never read one)."""
    length = body_length(content_length, transfer_encoding, limit)
    if length is None:
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "body: send Content-Length, not Transfer-Encoding")
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


def serve_routes_stdlib(
    routes: dict[tuple[str, str], Route], host: str, port: int, limits: HttpLimits | None = None
) -> BoundedHTTPServer:
    """Start serving `{(method, path): route}` from a daemon thread; `server.shutdown()` stops it."""
    limits = limits or HttpLimits()

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
            try:
                self._answer(method)
            finally:
                self.server.end_request()

        def _answer(self, method: str) -> None:
            headers: dict[str, str] = {}
            path = self.path.split("?", 1)[0]
            try:
                route = routes.get((method, path))
                length = stdlib_body_length(
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
