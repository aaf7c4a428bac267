"""The HTTP edge on real sockets: a negative or oversized Content-Length is refused and the connection closed, a
silent client is disconnected, and connections beyond the bound are turned away while the others are served."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from k2_workers.serve.endpoints import (
    BoundedHTTPServer,
    HttpError,
    HttpLimits,
    body_length,
    client_gone,
    serve_routes,
)
from tests.support.waits import wait_for

CLIENT_TIMEOUT_S = 20  # the tests fail, rather than hang, when the server never closes


def echo(body: bytes) -> tuple[int, dict[str, Any]]:
    return 200, {"bytes": len(body)}


@contextmanager
def echo_server(socket_timeout_s: float) -> Iterator[BoundedHTTPServer]:
    limits = HttpLimits(max_body_bytes=1024, socket_timeout_s=socket_timeout_s, max_connections=2)
    server = serve_routes({("POST", "/echo"): echo, ("GET", "/echo"): echo}, "127.0.0.1", 0, limits)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server() -> Iterator[BoundedHTTPServer]:
    with echo_server(socket_timeout_s=0.5) as server:
        yield server


def connect(server: BoundedHTTPServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port), timeout=CLIENT_TIMEOUT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_negative_content_length_is_a_400_and_the_connection_closes(server: BoundedHTTPServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + b"x" * 4096)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Content-Length: not a non-negative integer" in answer


def test_an_oversized_body_is_a_413_and_the_unread_body_is_not_taken_for_a_request(server: BoundedHTTPServer) -> None:
    smuggled = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"  # would be answered if the unread body were parsed
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + smuggled)
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.count(b"HTTP/1.1 ") == 1


def test_a_client_that_sends_nothing_more_is_disconnected(server: BoundedHTTPServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # slowloris: headers never finished
        assert read_until_closed(sock) == b""


def test_connections_beyond_the_bound_get_503_while_the_others_are_served() -> None:
    with echo_server(socket_timeout_s=60) as server:  # the kept-alive connections hold their slots
        connections_beyond_the_bound(server)


def connections_beyond_the_bound(server: BoundedHTTPServer) -> None:
    idle = [connect(server), connect(server)]  # two open connections take both slots
    try:
        for sock in idle:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        with connect(server) as third:
            third.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(third)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize(
    ("content_length", "encoding", "status"),
    [("-1", None, 400), ("+5", None, 400), ("abc", None, 400), ("1025", None, 413), ("5", "chunked", 411)],
)
def test_body_length_refuses_what_it_cannot_bound(content_length: str, encoding: str | None, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        body_length(content_length, encoding, 1024)
    assert caught.value.status == status


def test_body_length_of_a_good_request() -> None:
    assert body_length(None, None, 1024) == 0 and body_length(" 1024", None, 1024) == 1024


def test_a_route_notices_its_client_closing_the_connection() -> None:
    seen: list[bool] = []
    entered = threading.Event()

    def wait_for_the_client(_: bytes) -> tuple[int, dict[str, Any]]:
        seen.append(client_gone())
        entered.set()
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while not client_gone() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(client_gone())
        return 200, {}

    server = serve_routes({("POST", "/wait"): wait_for_the_client}, "127.0.0.1", 0, HttpLimits())
    try:
        with connect(server) as sock:
            sock.sendall(b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert entered.wait(CLIENT_TIMEOUT_S)
        wait_for("the route to see the client gone", lambda: len(seen) == 2)
        assert seen == [False, True] and not client_gone()  # outside a request: False
    finally:
        server.shutdown()
        server.server_close()
