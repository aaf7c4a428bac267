"""What an HTTP route is, independent of the server that runs it (no sockets, no torch).

A route is a blocking callable `body -> (status, JSON document) | Stream`, keyed by `(method, path)`. It refuses
with `HttpError` (status, message, headers), or `ValueError` for a bad body (400). While it blocks, `client_gone()`
tells it whether its client went away: the server sets a per-request event when the connection closes, and binds
it to the worker thread for each call it makes into the route or into its `Stream` (`bound_to`).

Errors on our own paths (`LEGACY_PATHS`) are `{"error": message}`, on every other path OpenAI's error JSON.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

from k2_api.contract import HttpPaths
from k2_workers.serve.openai_response import error_document

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


@dataclass(frozen=True)
class HttpLimits:
    """The bounds of the HTTP edge (`endpoints.serve_routes`)."""

    max_body_bytes: int = MAX_BODY_BYTES
    socket_timeout_s: float = 30.0  # most time for a request's headers, for its body, and idle between requests
    max_connections: int = 1024  # open connections, idle kept-alive ones included; one more gets 503
    max_requests: int = 256  # requests in flight, each on a worker thread while it blocks; one more gets 503

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_connections", "max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"http limits: {name} must be >= 1, got {getattr(self, name)}")
        if not self.socket_timeout_s > 0:
            raise ValueError(f"http limits: socket_timeout_s must be > 0, got {self.socket_timeout_s}")


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


_serving = threading.local()  # the client-gone event of the request this worker thread serves now

T = TypeVar("T")


def bound_to(gone: threading.Event, call: Callable[[], T]) -> T:
    """Run `call` with `gone` as this thread's request: `client_gone()` reads it meanwhile."""
    _serving.gone = gone
    try:
        return call()
    finally:
        _serving.gone = None


def client_gone() -> bool:
    """Whether the client of the request this thread serves went away (False outside a request): a route's way to
    notice a caller that left while it waits (the engine then cancels the request, the frontend its relay)."""
    gone: threading.Event | None = getattr(_serving, "gone", None)
    return gone is not None and gone.is_set()


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error JSON of `path`: ours on LEGACY_PATHS, OpenAI's elsewhere."""
    return {"error": message} if path in LEGACY_PATHS else error_document(status, message)


def body_length(content_length: str | None, transfer_encoding: str | None, limit: int) -> int | None:
    """The body's length from its headers, None for a chunked body (bounded while it is read); HttpError for a
    malformed, negative or too large one. (h11 refuses most malformed lengths before this is asked.)"""
    if transfer_encoding is not None:
        return None
    if content_length is None:
        return 0
    text = content_length.strip()
    if not text.isdigit():  # rejects "-1", "+5", "1e3", "": int() would take some of them
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length: not a non-negative integer: {content_length!r}")
    length = int(text)
    if length > limit:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: larger than {limit} bytes")
    return length
