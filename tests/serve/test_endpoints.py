"""The HTTP edge (uvicorn + our ASGI app) on real sockets: malformed, oversized and chunked-oversized bodies are
refused and the connection closed, slow headers and slow bodies are cut off, connections and requests beyond their
bounds get 503 with Retry-After while the others are served, a route and a stream notice their client leaving, and
drain waits for the requests in flight."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from k2_workers.serve.endpoints import HttpServer, serve_routes
from k2_workers.serve.http_routes import HttpError, HttpLimits, Route, Stream, body_length, client_gone
from tests.support.waits import wait_for

CLIENT_TIMEOUT_S = 20  # the tests fail, rather than hang, when the server never closes


def echo(body: bytes) -> tuple[int, dict[str, Any]]:
    return 200, {"bytes": len(body)}


@contextmanager
def running(routes: dict[tuple[str, str], Route], limits: HttpLimits) -> Iterator[HttpServer]:
    server = serve_routes(routes, "127.0.0.1", 0, limits)
    try:
        yield server
    finally:
        server.shutdown(grace_s=1)
        server.server_close()


def echo_server(socket_timeout_s: float) -> Any:
    limits = HttpLimits(max_body_bytes=1024, socket_timeout_s=socket_timeout_s, max_connections=2)
    return running({("POST", "/echo"): echo, ("GET", "/echo"): echo}, limits)


@pytest.fixture
def server() -> Iterator[HttpServer]:
    with echo_server(socket_timeout_s=0.5) as server:
        yield server


def connect(server: HttpServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port), timeout=CLIENT_TIMEOUT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_answer(sock: socket.socket) -> bytes:
    """One JSON answer on a kept-alive connection (headers and body may come in separate segments)."""
    received = b""
    while not (b"\r\n\r\n" in received and received.endswith(b"}")):
        received += sock.recv(65536)
    return received


def exchange(server: HttpServer, request: bytes) -> bytes:
    with connect(server) as sock:
        sock.sendall(request)
        return read_until_closed(sock)


def test_a_negative_content_length_is_a_400_and_the_connection_closes(server: HttpServer) -> None:
    answer = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" + b"x" * 4096)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in head.lower()  # the JSON error, not uvicorn's plain text
    assert json.loads(body)["error"]["message"] == "request: malformed HTTP (bad Content-Length)"


def test_an_oversized_body_is_a_413_and_the_unread_body_is_not_taken_for_a_request(server: HttpServer) -> None:
    smuggled = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"  # would be answered if the unread body were parsed
    answer = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b"larger than 1024 bytes" in answer


def test_a_client_still_sending_an_oversized_body_reads_its_413(server: HttpServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=CLIENT_TIMEOUT_S)
    try:  # the answer comes before the body is sent: the server reads and drops the rest, so nothing resets
        connection.request("POST", "/echo", b"x" * (2 << 20))
        response = connection.getresponse()
        assert response.status == 413 and b"larger than 1024 bytes" in response.read()
    finally:
        connection.close()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_is_bounded_too(server: HttpServer) -> None:
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    small = exchange(server, head + chunked(b"a" * 500, b"b" * 500))
    assert small.startswith(b"HTTP/1.1 200 ") and small.endswith(b'{"bytes": 1000}')
    large = exchange(server, head + chunked(*[b"c" * 600] * 4))
    assert large.startswith(b"HTTP/1.1 413 ") and b"larger than 1024 bytes" in large


def test_a_client_that_sends_its_headers_too_slowly_is_disconnected(server: HttpServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")  # slowloris: headers never finished
        for _ in range(3):  # a byte now and then does not extend the deadline
            time.sleep(0.2)
            sock.sendall(b"X")
        assert read_until_closed(sock) == b""


def test_a_body_that_stalls_is_a_408_and_the_connection_closes(server: HttpServer) -> None:
    answer = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"not received within 0.5 s" in answer


def test_connections_beyond_the_bound_get_503_while_the_others_are_served() -> None:
    with echo_server(socket_timeout_s=60) as server:  # the kept-alive connections hold their slots
        idle = [connect(server), connect(server)]  # two open connections take both slots
        try:
            for sock in idle:
                sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            answer = exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in answer
            idle[0].sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # the admitted ones are still served
            assert read_answer(idle[0]).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in idle:
                sock.close()


def test_requests_beyond_the_bound_get_503_and_a_request_after_them_is_served() -> None:
    release = threading.Event()

    def blocked(_: bytes) -> tuple[int, dict[str, Any]]:
        release.wait(CLIENT_TIMEOUT_S)
        return 200, {}

    limits = HttpLimits(max_requests=2)
    with running({("GET", "/block"): blocked, ("GET", "/echo"): echo}, limits) as server:
        held = [connect(server), connect(server)]
        try:
            for sock in held:
                sock.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_for("both requests in flight", lambda: server.in_flight == 2)
            answer = exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
            assert b"2 requests in flight" in answer
            assert not server.drain(0.1)
            release.set()
            assert all(read_answer(sock).startswith(b"HTTP/1.1 200 ") for sock in held)
            assert server.drain(CLIENT_TIMEOUT_S)
            answer = exchange(server, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()


@pytest.mark.parametrize(
    ("content_length", "encoding", "status"),
    [("-1", None, 400), ("+5", None, 400), ("abc", None, 400), ("1025", None, 413)],
)
def test_body_length_refuses_what_it_cannot_bound(content_length: str, encoding: str | None, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        body_length(content_length, encoding, 1024)
    assert caught.value.status == status


def test_body_length_of_a_good_request() -> None:
    assert body_length(None, None, 1024) == 0 and body_length(" 1024", None, 1024) == 1024
    assert body_length(None, "chunked", 1024) is None  # bounded while it is read


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

    with running({("POST", "/wait"): wait_for_the_client}, HttpLimits()) as server:
        with connect(server) as sock:
            sock.sendall(b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert entered.wait(CLIENT_TIMEOUT_S)
        wait_for("the route to see the client gone", lambda: len(seen) == 2)
        assert seen == [False, True] and not client_gone()  # outside a request: False


def test_a_stream_is_sent_as_it_comes_and_closed_when_its_client_leaves() -> None:
    produced = threading.Semaphore(0)
    closed = threading.Event()

    def events() -> Iterator[bytes]:
        try:
            for index in range(10_000):
                yield b"data: %d\n\n" % index
                produced.release()
                time.sleep(0.01)
        finally:
            closed.set()

    def stream(_: bytes) -> Stream:
        return Stream(events())

    with running({("GET", "/stream"): stream}, HttpLimits()) as server:
        with connect(server) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"data: 1\n\n" not in received:  # the first events arrive while the stream goes on
                received += sock.recv(65536)
            assert b"text/event-stream" in received and b"chunked" in received.lower()
        assert closed.wait(CLIENT_TIMEOUT_S)  # the client left: the events were closed long before the last
        wait_for("the request to end", lambda: server.in_flight == 0)
