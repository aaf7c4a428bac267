"""The frontend: one HTTP endpoint that routes generate requests across the serving groups.

Round-robin over the groups' rank-0 URLs, moving on to the next group when one is unreachable or answers 5xx, so a
group that is down or rolling does not fail requests while another group serves; 503 only when no group can serve.
The frontend only proxies HTTP: this module and everything it imports stay free of torch, so the frontend process
starts fast and small (`benchmarks/frontend_start.py`).
"""

from __future__ import annotations

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
from k2_workers.serve.endpoints import GENERATE_PATH, HttpError, HttpLimits, Route, serve_routes

log = logging.getLogger(__name__)


class GroupRouter:
    """Forwards a request to one group after another, starting at the next in round-robin order."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 120.0) -> None:
        if not endpoints:
            raise ValueError("endpoints: the frontend needs at least one group endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._next = itertools.cycle(range(len(self.endpoints)))
        self._lock = threading.Lock()
        self._timeout_s = timeout_s

    def forward(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The first answer below 500 from a group, with `"group"` added when it succeeded."""
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
        return router.forward(GENERATE_PATH, body)

    return {("GET", HttpPaths.HEALTHZ): healthz, ("POST", GENERATE_PATH): generate}


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
