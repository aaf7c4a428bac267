"""uvicorn's h11 protocol with the two bounds it lacks, a deadline on a request's headers and a connection cap that
answers 503 with Retry-After, and a lingering close.

uvicorn times out idle kept-alive connections only until their first byte: a client that sends a request's
headers one byte at a time (slowloris) holds its connection for ever. Here the headers must be complete within
`timeout_s` of the connection opening, or of the previous answer; a client that misses it is disconnected.

uvicorn's own `limit_concurrency` answers 503 without Retry-After, and counts the refused connection itself. Here
a connection past `max_connections` gets `503` with `Retry-After` at once, then a half-close: what the client still
sends is read and dropped for `LINGER_S` (closing with unread bytes would reset the connection, and the client
could lose the answer).

uvicorn answers a request h11 cannot parse (bad framing: a malformed Content-Length, a bad request line) with a
plain-text 400; here it is the JSON error every other refusal gets, naming h11's reason.

uvicorn closes a connection at once after an answer that ends it; when the request's body is still coming (a 413
before the body was read, a 400 for bad framing), the client would get a reset while it sends, and often never read
the answer. Here such a close lingers the same way: half-close, read and drop for `LINGER_S` (at most
`LINGER_BYTES`), then close.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from k2_workers.serve.http_app import RESET
from k2_workers.serve.openai_response import error_document

LINGER_S = 1.0
LINGER_BYTES = 4 << 20
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: `close` lingers (`BoundedH11Protocol._linger`) while the
    client may still be sending; everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._protocol.close_lingering()

    def is_closing(self) -> bool:
        return self._closed or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedH11Protocol(H11Protocol):
    """`H11Protocol` with a header deadline and a connection cap (set by `bounded_h11`)."""

    timeout_s: float = 30.0
    max_connections: int = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None
        self._discarding = False  # refused or lingering: what the client sends is dropped
        self._discarded = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._await_headers()

    def data_received(self, data: bytes) -> None:
        if not self._discarding:
            super().data_received(data)
            return
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES:
            self._close_now()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request's headers are in (or the connection failed)
            self._cancel_deadline()
        if self.cycle is not None and not self.cycle.response_started:  # its app has not run yet, or just began
            extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
            extensions[RESET] = self.reset

    def send_400_response(self, msg: str) -> None:
        """A request h11 could not parse: 400 with the JSON error (OpenAI's form: its path may not be known), then
        the connection closes. Called while uvicorn handles h11's RemoteProtocolError, whose reason it names."""
        error = sys.exc_info()[1]
        body = json.dumps(error_document(400, f"request: malformed HTTP ({error or msg})")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def reset(self) -> None:
        """Reset the connection now (an answer cut short: its client stopped reading, or its source broke)."""
        if self._raw is not None and not self._raw.is_closing():
            self._raw.abort()

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
        self._close_now()

    def _refuse(self) -> None:
        self.connections.discard(self)  # a refused connection holds no slot while it lingers
        assert self._raw is not None
        self._raw.write(_BUSY)
        self._linger()

    def close_lingering(self) -> None:
        """uvicorn's close: a reset when our answer was cut short (what is still buffered for a client that stopped
        reading would never be sent); at once when the client has sent its whole request (or nothing of the next);
        else after lingering."""
        if self.conn.our_state is h11.SEND_BODY:  # an answer cut short (its client stopped reading): reset
            assert self._raw is not None
            self._raw.abort()
        elif self.conn.their_state in (h11.DONE, h11.IDLE, h11.MUST_CLOSE, h11.CLOSED):
            self._close_now()
        else:
            self._linger()

    def _linger(self) -> None:
        assert self._raw is not None
        if self._discarding or self._raw.is_closing():
            return
        self._discarding = True
        self._raw.resume_reading()  # uvicorn may have paused it (a large body, a pipelined request)
        if self._raw.can_write_eof():
            self._raw.write_eof()  # after what is buffered: the answer goes out first
        self.loop.call_later(LINGER_S, self._close_now)

    def _close_now(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.close()


def bounded_h11(timeout_s: float, max_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class that uvicorn's `Config(http=...)` instantiates per connection, with these bounds."""
    return type(
        "BoundedH11Protocol", (BoundedH11Protocol,), {"timeout_s": timeout_s, "max_connections": max_connections}
    )
