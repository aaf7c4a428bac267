"""Requests the frontend answered, for the live summary: the generation routes (POST) wrapped to count each answer as
served (200, a stream to its end) or failed (any other status, an error, a stream that broke). A stream whose client
left counts as neither."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from k2_workers.serve.http_routes import Route, Stream


@dataclass
class RequestCounts:
    served: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.served += 1
            else:
                self.failed += 1


def counted(routes: dict[tuple[str, str], Route], counts: RequestCounts) -> dict[tuple[str, str], Route]:
    """`routes` with every POST route counted in `counts`."""
    return {key: _counted(route, counts) if key[0] == "POST" else route for key, route in routes.items()}


def _counted(route: Route, counts: RequestCounts) -> Route:
    def wrapped(body: bytes) -> tuple[int, dict[str, Any]] | Stream:
        try:
            answer = route(body)
        except Exception:  # an HttpError (a 503 when no group took it, a 4xx) or a 500
            counts.add(False)
            raise
        if isinstance(answer, Stream):
            return Stream(_counted_events(answer.events, counts))
        counts.add(answer[0] == HTTPStatus.OK)
        return answer

    return wrapped


def _counted_events(events: Iterable[bytes], counts: RequestCounts) -> Generator[bytes, None, None]:
    try:
        yield from events
    except GeneratorExit:  # the client left: the answer was neither served nor failed
        raise
    except Exception:
        counts.add(False)
        raise
    counts.add(True)
