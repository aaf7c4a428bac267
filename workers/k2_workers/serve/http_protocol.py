"""uvicorn's h11 protocol with the two bounds it lacks: a deadline on a request's headers, and a connection cap
that answers 503 with Retry-After.

uvicorn times out idle kept-alive connections only until their first byte: a client that sends a request's
headers one byte at a time (slowloris) holds its connection for ever. Here the headers must be complete within
`timeout_s` of the connection opening, or of the previous answer; a client that misses it is disconnected.

uvicorn's own `limit_concurrency` answers 503 without Retry-After, and counts the refused connection itself. Here
a connection past `max_connections` gets `503` with `Retry-After` at once, then a half-close: what the client still
sends is read and dropped for `LINGER_S` (closing with unread bytes would reset the connection, and the client
could lose the answer).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 1.0
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


class BoundedH11Protocol(H11Protocol):
    """`H11Protocol` with a header deadline and a connection cap (set by `bounded_h11`)."""

    timeout_s: float = 30.0
    max_connections: int = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._await_headers()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in (or the connection failed)
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()  # the next request's headers get the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_deadline()
        self._header_deadline = self.loop.call_later(self.timeout_s, self._headers_late)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)  # a refused connection holds no slot while it lingers
        self.transport.write(_BUSY)
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_h11(timeout_s: float, max_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class that uvicorn's `Config(http=...)` instantiates per connection, with these bounds."""
    return type(
        "BoundedH11Protocol", (BoundedH11Protocol,), {"timeout_s": timeout_s, "max_connections": max_connections}
    )
