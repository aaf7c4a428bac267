"""The HTTP edge under load on real sockets: slowloris headers, stalled bodies, SSE clients that stop reading, slow
readers and connections past the bound, all at once. The server keeps its bounds (worker threads, requests in
flight, connections: 503 with Retry-After past them), cuts every stalled client within its deadlines (a stream
whose client stopped reading has its events closed), serves the slow readers whole, and afterwards the same good
request succeeds. `-s` prints the figures."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.http_routes import HttpLimits, Stream
from tests.support.waits import wait_for

TIMEOUT_S = 1.0  # the server's header, body and send deadlines
LIMITS = HttpLimits(max_body_bytes=4096, socket_timeout_s=TIMEOUT_S, max_connections=24, max_requests=12)
SLOWLORIS, STALLED_BODIES, STALLED_READERS, SLOW_READERS = 8, 4, 3, 3
SLOW_EVENTS = 10
CHUNK = b"data: " + b"x" * 65536 + b"\n\n"  # a stalled reader's socket buffers fill after a few
CLIENT_TIMEOUT_S = 30


class Source:
    """`GET /stream?n` events of CHUNK, endless for `/stream`; counts the streams open and closed."""

    def __init__(self) -> None:
        self.open = 0
        self.closed = 0
        self.lock = threading.Lock()

    def stream(self, body: bytes) -> Stream:
        count = int(body or b"1000000")

        def events() -> Iterator[bytes]:
            with self.lock:
                self.open += 1
            try:
                for _ in range(count):
                    yield CHUNK
            finally:
                with self.lock:
                    self.open -= 1
                    self.closed += 1

        return Stream(events())


def echo(body: bytes) -> tuple[int, dict[str, Any]]:
    return 200, {"bytes": len(body)}


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S)


def read_until_closed(sock: socket.socket, pause_s: float = 0.0) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
            time.sleep(pause_s)
    except ConnectionResetError:
        pass
    return received


def pool_threads(port: int) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(f"http-{port}-"))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_slow_and_stalled_clients_stay_bounded_and_a_good_request_succeeds_after() -> None:
    source = Source()
    routes = {("POST", "/echo"): echo, ("POST", "/stream"): source.stream}
    server = serve_routes(routes, "127.0.0.1", 0, LIMITS)
    port = server.server_port
    rss_before = rss_kib()
    good = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    sockets: list[socket.socket] = []
    try:
        slowloris = [connect(port) for _ in range(SLOWLORIS)]
        for sock in slowloris:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        stalled_bodies = [connect(port) for _ in range(STALLED_BODIES)]
        for sock in stalled_bodies:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        stalled_readers = [connect(port) for _ in range(STALLED_READERS)]
        for sock in stalled_readers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sockets = slowloris + stalled_bodies + stalled_readers
        wait_for("the stalled streams open", lambda: source.open == STALLED_READERS)

        slow_body = b"%d" % SLOW_EVENTS
        slow_request = b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(
            slow_body
        )

        def slow_reader() -> bytes:
            with connect(port) as sock:
                sock.sendall(slow_request + slow_body)
                return read_until_closed(sock, pause_s=0.02)

        with ThreadPoolExecutor(SLOW_READERS) as clients:
            slow = [clients.submit(slow_reader) for _ in range(SLOW_READERS)]
            wait_for("the slow streams open", lambda: source.open + source.closed == STALLED_READERS + SLOW_READERS)
            peak_in_flight = server.in_flight
            # connections past the bound: the open ones above, plus these, are more than max_connections
            beyond = [connect(port) for _ in range(LIMITS.max_connections)]
            answers = []
            for sock in beyond:
                sock.sendall(good)
                answers.append(read_until_closed(sock))
                sock.close()
            busy = sum(a.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in a for a in answers)
            served = sum(a.startswith(b"HTTP/1.1 200 ") for a in answers)
            peak_in_flight = max(peak_in_flight, server.in_flight)
            peak_threads = pool_threads(port)
            rss_peak = rss_kib()
            slow_answers = [s.result(timeout=CLIENT_TIMEOUT_S) for s in slow]
        assert busy > 0 and busy + served == len(answers)  # none left waiting: a 503 at once, or served
        assert all(a.startswith(b"HTTP/1.1 200 ") and a.count(CHUNK) == SLOW_EVENTS for a in slow_answers)

        assert all(read_until_closed(sock) == b"" for sock in slowloris)  # cut, without an answer
        assert all(read_until_closed(sock).startswith(b"HTTP/1.1 408 ") for sock in stalled_bodies)
        wait_for("the stalled streams' events closed", lambda: source.open == 0)
        wait_for("no request in flight", lambda: server.in_flight == 0)
        assert source.closed == STALLED_READERS + SLOW_READERS

        with connect(port) as sock:
            sock.sendall(good)
            assert read_until_closed(sock).endswith(b'{"bytes": 5}')
        assert peak_threads <= LIMITS.max_requests and peak_in_flight <= LIMITS.max_requests
        print(
            f"\nHTTP load: limits {LIMITS.max_connections} connections, {LIMITS.max_requests} requests, "
            f"{TIMEOUT_S:.0f} s deadlines; {SLOWLORIS} slowloris, {STALLED_BODIES} stalled bodies, "
            f"{STALLED_READERS} stalled SSE readers, {SLOW_READERS} slow SSE readers, {len(answers)} connections "
            f"more -> {busy} 503 with Retry-After, {served} served; requests in flight at most {peak_in_flight}, "
            f"worker threads at most {peak_threads}; RSS {rss_before // 1024} MiB before, {rss_peak // 1024} MiB "
            f"under load, {rss_kib() // 1024} MiB after"
        )
    finally:
        for sock in sockets:
            sock.close()
        server.shutdown(grace_s=1)
