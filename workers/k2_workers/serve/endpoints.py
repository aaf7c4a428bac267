"""HTTP endpoints of a serving rank and of the frontend (stdlib `http.server`, one thread per connection).

Rank 0 of a group: `POST /v1/generate`, `GET /v1/placement`, `GET /healthz`. Other ranks: `GET /healthz` only (the
readiness probe). A bad request gets 400 with `{"error": ...}`, an unready rank 503, an unexpected failure 500; the
server itself never stops on a bad request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
GENERATE_PATH = "/v1/generate"  # rank 0 and the frontend
PLACEMENT_PATH = "/v1/placement"  # rank 0

Route = Callable[[bytes], tuple[int, dict[str, Any]]]  # body -> (status, JSON document)


class HttpError(Exception):
    """An answer other than 200: `status`, `{"error": message}` and extra `headers` (e.g. Retry-After)."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def serve_routes(routes: dict[tuple[str, str], Route], host: str, port: int) -> ThreadingHTTPServer:
    """Start serving `{(method, path): route}` from a daemon thread; `server.shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            headers: dict[str, str] = {}
            try:
                route = routes.get((method, self.path.split("?", 1)[0]))
                if route is None:
                    raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body: larger than {MAX_BODY_BYTES} bytes")
                status, document = route(self.rfile.read(length) if length else b"")
            except HttpError as error:
                status, document, headers = error.status, {"error": str(error)}, error.headers
            except ValueError as error:
                status, document = HTTPStatus.BAD_REQUEST, {"error": str(error)}
            except Exception as error:
                log.exception("request %s %s failed", method, self.path)
                status, document = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {error}"}
            payload = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True).start()
    return server
