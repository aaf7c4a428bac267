"""The HTTP server of a serving rank and of the frontend: a plain ASGI app (`http_app`) on uvicorn with h11.

Rank 0 of a group: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, our `POST /v1/generate`,
`GET /v1/placement`, `GET /healthz`. Other ranks: `GET /healthz` only (the readiness probe). The routes are blocking
functions (`http_routes`); this module only runs them.

Why uvicorn with h11 and no framework: we serve six exact `(method, path)` routes whose bodies are raw bytes that
our own parsers validate, answer our own error JSON, and stream server-sent events; what we need from a server is
HTTP/1.1 parsing that refuses malformed framing (h11, already a dependency of httpx), an event loop that holds idle
and slow connections without a thread each, and graceful shutdown. uvicorn gives exactly that and adds only `click`.
Starlette (or FastAPI) would add routing, request objects and middleware that we would bypass to keep control of
`receive()`: the body bound, the body deadline and the disconnect that cancels a request. uvicorn[standard]
(uvloop, httptools) is left out: the engine, not the parser, is the bottleneck (`benchmarks/serving_apis.py`).

The bounds (`HttpLimits`): headers within `socket_timeout_s` (`http_protocol`: uvicorn has no header deadline), at
most 16 KiB of them (h11's limit, 400 past it), the body within `socket_timeout_s` (408) and at most `max_body_bytes`
(413, chunked bodies too), a malformed or negative Content-Length 400 (h11); at most `max_connections` connections
(one more: 503 with Retry-After, then closed) and `max_requests` requests in flight (one more: 503 with Retry-After),
each running on one of at most `max_requests` daemon threads. Idle kept-alive connections close after
`socket_timeout_s`.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time

import uvicorn

from k2_workers.serve.http_app import RoutesApp
from k2_workers.serve.http_protocol import bounded_h11
from k2_workers.serve.http_routes import HttpLimits, Route
from k2_workers.serve.thread_pool import DaemonThreadPool

__all__ = ["HttpLimits", "HttpServer", "serve_routes"]

START_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 5.0  # how long `shutdown` lets the requests in flight finish before it cancels them


class HttpServer:
    """A running server: `server_port`, `drain` (wait for the requests in flight) and `shutdown`."""

    def __init__(self, server: uvicorn.Server, app: RoutesApp, listener: socket.socket) -> None:
        self._server = server
        self._app = app
        self._listener = listener
        self.server_port: int = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"http-{self.server_port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._listener]))

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server on port {self.server_port} did not start")
            time.sleep(0.005)

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._app.in_flight

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (new ones are still taken); False on timeout."""
        return self._app.drain(timeout_s)

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop taking connections, close the idle ones, give the requests in flight `grace_s` to finish, then
        cancel them (their routes see `client_gone()`) and return."""
        if not self._thread.is_alive():
            return
        self._server.config.timeout_graceful_shutdown = math.ceil(grace_s)
        self._server.should_exit = True
        self._thread.join(grace_s + 5.0)
        self._app.cancel_all()

    def server_close(self) -> None:
        """Release the listening socket (`shutdown` has closed it already)."""
        self._listener.close()


def serve_routes(
    routes: dict[tuple[str, str], Route], host: str, port: int, limits: HttpLimits | None = None
) -> HttpServer:
    """Start serving `{(method, path): route}` on host:port (0: any free port) from a daemon thread; the socket
    listens when this returns. `server.shutdown()` stops it."""
    limits = limits or HttpLimits()
    listener = socket.create_server((host, port), backlog=limits.max_connections)
    app = RoutesApp(routes, limits, DaemonThreadPool(limits.max_requests, f"http-{listener.getsockname()[1]}"))
    config = uvicorn.Config(
        app,
        http=bounded_h11(limits.socket_timeout_s, limits.max_connections),
        loop="asyncio",
        lifespan="off",
        ws="none",
        interface="asgi3",
        timeout_keep_alive=max(1, round(limits.socket_timeout_s)),
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        backlog=limits.max_connections,
    )
    server = HttpServer(uvicorn.Server(config), app, listener)
    server.wait_started()
    return server
