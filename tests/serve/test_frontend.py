"""The frontend: it routes across groups, moving on only from a group that did not take the request (unreachable,
503, 429, or died without an answer) so that no request runs on two groups, passes every other answer through,
and its process never imports torch."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from k2_workers.serve.endpoints import HttpServer, serve_routes
from k2_workers.serve.frontend import GroupRouter
from k2_workers.serve.group_wait import GroupWait
from k2_workers.serve.http_routes import HttpError, Route
from tests.serve.worker_process import request
from tests.support.ports import free_port
from tests.support.waits import wait_for


class StubGroup:
    """A group's rank 0 that answers every generate request with `status` (after `delay_s`) and counts them."""

    def __init__(self, status: int, delay_s: float = 0.0, port: int = 0) -> None:
        self.status = status
        self.delay_s = delay_s
        self.calls = 0
        routes: dict[tuple[str, str], Route] = {("POST", "/v1/generate"): self._generate}
        self.server: HttpServer = serve_routes(routes, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _generate(self, body: bytes) -> tuple[int, dict[str, Any]]:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.status >= 400:
            raise HttpError(HTTPStatus(self.status), f"stub answers {self.status}")
        return self.status, {"text": "ok", "echo": body.decode()}


@pytest.fixture
def stubs() -> Iterator[dict[int, StubGroup]]:
    groups = {status: StubGroup(status) for status in (200, 400, 429, 500, 503)}
    yield groups
    for group in groups.values():
        group.server.shutdown()
        group.server.server_close()


def test_requests_skip_groups_that_did_not_take_them(stubs: dict[int, StubGroup]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = GroupRouter([dead, stubs[503].url, stubs[429].url, stubs[200].url + "/"])
    for _ in range(4):  # round-robin starts at the dead group, the unready one, the full one, then the live one
        status, body = router.forward("/v1/generate", b'{"prompt": "x"}')
        assert (status, body) == (200, {"text": "ok", "echo": '{"prompt": "x"}', "group": stubs[200].url})
    assert stubs[503].calls == 2 and stubs[429].calls == 3 and stubs[200].calls == 4


def test_a_group_that_ran_the_request_and_failed_is_the_answer_not_retried(stubs: dict[int, StubGroup]) -> None:
    router = GroupRouter([stubs[500].url, stubs[200].url])
    status, body = router.forward("/v1/generate", b"{}")
    assert status == 500 and "stub answers 500" in body["error"]
    assert stubs[500].calls == 1 and stubs[200].calls == 0


def test_a_group_that_took_the_request_and_is_slow_is_never_doubled(stubs: dict[int, StubGroup]) -> None:
    slow = StubGroup(200, delay_s=3.0)
    try:
        router = GroupRouter([slow.url, stubs[200].url], timeout_s=0.5)
        with pytest.raises(HttpError) as caught:
            router.forward("/v1/generate", b"{}")
        assert caught.value.status == HTTPStatus.GATEWAY_TIMEOUT and "no answer within 0.5s" in str(caught.value)
        assert slow.calls == 1 and stubs[200].calls == 0
    finally:
        slow.server.shutdown()
        slow.server.server_close()


def test_a_group_that_dies_with_the_request_is_left_for_the_next(stubs: dict[int, StubGroup]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as dying:  # takes the request, then closes without an answer
        port = dying.getsockname()[1]

        def close_after_reading() -> None:
            connection, _ = dying.accept()
            connection.recv(65536)
            connection.close()

        closer = threading.Thread(target=close_after_reading)
        closer.start()
        router = GroupRouter([f"http://127.0.0.1:{port}", stubs[200].url])
        status, body = router.forward("/v1/generate", b"{}")
        closer.join(timeout=30)
    assert status == 200 and body["group"] == stubs[200].url and stubs[200].calls == 1


def test_a_group_whose_address_answers_no_handshake_is_passed_over_after_the_connect_timeout(
    stubs: dict[int, StubGroup],
) -> None:
    # A listener that never accepts, its accept queue filled: the kernel drops every further SYN, as a peer's stale
    # neighbour entry or a dead pod's address does, so the connection is never made and no request is ever sent.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as silent:
        port = silent.getsockname()[1]
        queued = [socket.create_connection(("127.0.0.1", port), timeout=2)]  # backlog 0: one fills the queue
        with pytest.raises(TimeoutError):  # the next handshake is not answered
            queued.append(socket.create_connection(("127.0.0.1", port), timeout=0.3))
        try:
            router = GroupRouter([f"http://127.0.0.1:{port}", stubs[200].url], connect_timeout_s=0.5)
            status, body = router.forward("/v1/generate", b"{}")
            assert status == 200 and body["group"] == stubs[200].url
            with pytest.raises(HttpError) as caught:
                GroupRouter([f"http://127.0.0.1:{port}"], wait=GroupWait(0), connect_timeout_s=0.5).forward(
                    "/v1/generate", b"{}"
                )
        finally:
            for connection in queued:
                connection.close()
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert "no connection within 0.5s" in str(caught.value) and "1 round in" in str(caught.value)


def test_when_every_queue_is_full_the_answer_is_429(stubs: dict[int, StubGroup]) -> None:
    with pytest.raises(HttpError) as caught:
        GroupRouter([stubs[429].url]).forward("/v1/generate", b"{}")
    assert caught.value.status == HTTPStatus.TOO_MANY_REQUESTS and caught.value.headers == {"Retry-After": "1"}


def test_a_bad_request_is_answered_by_the_first_group_without_trying_the_others(stubs: dict[int, StubGroup]) -> None:
    router = GroupRouter([stubs[400].url, stubs[200].url])
    status, body = router.forward("/v1/generate", b"{}")
    assert status == 400 and "stub answers 400" in body["error"]
    assert stubs[200].calls == 0


def test_no_group_able_to_serve_is_a_503_naming_each_group(stubs: dict[int, StubGroup]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HttpError) as caught:
        GroupRouter([dead, stubs[503].url], wait=GroupWait(0)).forward("/v1/generate", b"{}")
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert dead in str(caught.value) and f"{stubs[503].url}: HTTP 503" in str(caught.value)


def test_a_frontend_needs_a_group() -> None:
    with pytest.raises(ValueError, match="endpoints"):
        GroupRouter([])


def test_the_frontend_process_serves_without_importing_torch(tmp_path: Path) -> None:
    port, group = free_port(), f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-X", "importtime", "-m", "k2_workers.serve", "--frontend", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--endpoints", group, "--grpc-port", "0"]
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            body = wait_for("the frontend's /healthz", lambda: _healthz(port, process), timeout_s=120)
            assert body == {"status": "ok", "groups": 1}
        finally:
            process.terminate()
            process.wait(timeout=30)
    # -X importtime: one line per module the process imported, "import time: self | cumulative | module"
    imported = {line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines() if "import time:" in line}
    assert "k2_workers.serve.frontend" in imported
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def _healthz(port: int, process: subprocess.Popen[str]) -> dict[str, Any] | None:
    assert process.poll() is None, f"the frontend exited with {process.returncode}"
    try:
        status, body = request(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except OSError:
        return None
    return body if status == 200 else None
