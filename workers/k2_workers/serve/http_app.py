"""The ASGI application that serves a table of routes (`http_routes`): a plain ASGI callable, no framework.

Per request: at most `max_requests` in flight (one more gets 503 with Retry-After); the body read within
`socket_timeout_s` (408 after) and at most `max_body_bytes`, whether Content-Length says so first or a chunked
body grows past it (413); a refused body closes the connection, so an unread body is never taken for a request.
The route then runs on the worker pool, while a task watches for the client's `http.disconnect` and sets the
request's event that `client_gone()` reads. A `Stream` is sent as it comes, one `http.response.body` per item, each
item fetched on the pool; a client gone midway, or the stream closed, closes `events`.

A bad request gets 400, an unready route 503, an unexpected failure 500; nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from http import HTTPStatus
from typing import Any

from k2_workers.serve.http_routes import HttpError, HttpLimits, Route, Stream, body_length, bound_to, error_body
from k2_workers.serve.thread_pool import DaemonThreadPool

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

RETRY_AFTER_S = 1  # what a 503 for too many requests in flight asks the client to wait
_END = object()  # a stream's end, from `next(events, _END)`
RESET = "k2.reset"  # the scope extension that resets the request's connection (`http_protocol`)


class RoutesApp:
    """An ASGI app over `{(method, path): route}`, its blocking calls on `pool`; counts requests in flight."""

    def __init__(self, routes: dict[tuple[str, str], Route], limits: HttpLimits, pool: DaemonThreadPool) -> None:
        self._routes = routes
        self._limits = limits
        self._pool = pool
        self._in_flight: set[threading.Event] = set()  # the client-gone events of the requests in flight
        self._idle = threading.Condition()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False when some still are after `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout_s)

    def cancel_all(self) -> None:
        """Treat every request in flight as one whose client went away (a server that stops for good)."""
        with self._idle:
            for gone in self._in_flight:
                gone.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off, websockets are not served
            return
        path = scope["path"]
        gone = threading.Event()
        with self._idle:
            admitted = len(self._in_flight) < self._limits.max_requests
            if admitted:
                self._in_flight.add(gone)
        if not admitted:
            message = f"busy: {self._limits.max_requests} requests in flight"
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            document = error_body(path, HTTPStatus.SERVICE_UNAVAILABLE, message)
            await send_json(send, HTTPStatus.SERVICE_UNAVAILABLE, document, headers, close=True)
            return
        try:
            await self._serve(scope, receive, send, gone)
        finally:
            with self._idle:
                self._in_flight.discard(gone)
                self._idle.notify_all()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, gone: threading.Event) -> None:
        method, path = scope["method"], scope["path"]
        try:
            body = await self._read_body(scope, receive)
            if body is None:  # the client left before its body was in
                return
            route = self._routes.get((method, path))
            if route is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")
        except HttpError as error:  # the body may be unread: it must not be taken for the next request
            await send_error(send, path, error, close=True)
            return
        watcher = asyncio.create_task(watch_disconnect(receive, gone))
        try:
            answer = await self._pool.run(functools.partial(bound_to, gone, functools.partial(route, body)))
            if isinstance(answer, Stream):
                await self._stream(send, answer, gone, scope.get("extensions", {}).get(RESET))
            else:
                await send_json(send, *answer)
        except asyncio.CancelledError:  # the server stops: the route, still blocked on its thread, learns it now
            gone.set()
            raise
        except HttpError as error:
            await send_error(send, path, error)
        except ValueError as error:
            await send_json(send, HTTPStatus.BAD_REQUEST, error_body(path, HTTPStatus.BAD_REQUEST, str(error)))
        except Exception as error:
            log.exception("request %s %s failed", method, path)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            await send_json(send, status, error_body(path, status, f"internal error: {error}"))
        finally:
            watcher.cancel()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body (None when the client left first); HttpError 413 past the limit, 408 past the timeout."""
        headers = {name.lower(): value for name, value in scope["headers"]}
        encoding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        limit = self._limits.max_body_bytes
        body_length(None if length is None else length.decode("latin-1"), encoding and encoding.decode(), limit)
        pieces: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._limits.socket_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    piece = message.get("body", b"")
                    size += len(piece)
                    if size > limit:
                        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: larger than {limit} bytes")
                    pieces.append(piece)
                    if not message.get("more_body", False):
                        return b"".join(pieces)
        except TimeoutError:
            timeout = self._limits.socket_timeout_s
            raise HttpError(HTTPStatus.REQUEST_TIMEOUT, f"body: not received within {timeout} s") from None

    async def _stream(
        self, send: Send, stream: Stream, gone: threading.Event, reset: Callable[[], None] | None
    ) -> None:
        """Send the events as they come; a client gone, one that reads nothing for `socket_timeout_s` (its buffers
        full), or a source that breaks midway ends the response early (the connection closes without the last
        chunk, so the client sees the stream cut)."""
        headers = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache")]
        await send({"type": "http.response.start", "status": HTTPStatus.OK, "headers": headers})
        events: Iterator[bytes] = iter(stream.events)
        try:
            while not gone.is_set():
                chunk = await self._pool.run(functools.partial(bound_to, gone, functools.partial(next, events, _END)))
                end = chunk is _END
                message = {"type": "http.response.body", "body": b"" if end else chunk, "more_body": not end}
                if not await self._send_in_time(send, message, gone):
                    await cut(reset)
                    return
                if end:
                    return
        except (ConnectionError, TimeoutError) as error:  # a group's stream that broke: cut ours too
            log.warning("a stream ended early: %s", error)
            await cut(reset)
        finally:  # its source learns it now (a request stops decoding, a relay closes its group's connection)
            close = getattr(stream.events, "close", None)
            if close is not None:
                await self._pool.run(functools.partial(bound_to, gone, close))

    async def _send_in_time(self, send: Send, message: Message, gone: threading.Event) -> bool:
        """Send `message`, unless the client read nothing for `socket_timeout_s`: then it counts as gone."""
        try:
            await asyncio.wait_for(send(message), self._limits.socket_timeout_s)
        except TimeoutError:
            log.info("a stream's client read nothing for %s s: cut", self._limits.socket_timeout_s)
            gone.set()
            return False
        return True


async def cut(reset: Callable[[], None] | None) -> None:
    """End a response midway: reset the connection (`RESET`, from `http_protocol`) and let the loop see it closed,
    so that the server takes the unfinished answer for a client gone rather than for an app's mistake."""
    if reset is None:  # another server: it closes the connection itself, and may log the unfinished answer
        return
    reset()
    for _ in range(2):  # the transport reports the connection lost on the next turn of the loop
        await asyncio.sleep(0)


async def watch_disconnect(receive: Receive, gone: threading.Event) -> None:
    """Set `gone` when the client closes its connection (the body was read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def send_json(
    send: Send, status: int, document: dict[str, Any], headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A JSON answer; `close` ends the connection after it (h11 honours `Connection: close`)."""
    payload = json.dumps(document).encode()
    extra = dict(headers or {}) | ({"Connection": "close"} if close else {})
    raw = [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(payload)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in extra.items()]  # h11 keeps their case
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(send: Send, path: str, error: HttpError, close: bool = False) -> None:
    document = error.document or error_body(path, error.status, str(error))
    await send_json(send, error.status, document, error.headers, close)
