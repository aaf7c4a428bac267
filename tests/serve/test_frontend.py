"""The frontend: it routes across groups, skipping unreachable and failing ones, passes a bad request's answer
through, and its process never imports torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from k2_workers.serve.endpoints import BoundedHTTPServer, HttpError, Route, serve_routes
from k2_workers.serve.frontend import GroupRouter
from tests.serve.worker_process import request
from tests.support.ports import free_port
from tests.support.waits import wait_for


class StubGroup:
    """A group's rank 0 that answers every generate request with `status` and counts the requests."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls = 0
        routes: dict[tuple[str, str], Route] = {("POST", "/v1/generate"): self._generate}
        self.server: BoundedHTTPServer = serve_routes(routes, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _generate(self, body: bytes) -> tuple[int, dict[str, Any]]:
        self.calls += 1
        if self.status >= 400:
            raise HttpError(HTTPStatus(self.status), f"stub answers {self.status}")
        return self.status, {"text": "ok", "echo": body.decode()}


@pytest.fixture
def stubs() -> Iterator[dict[int, StubGroup]]:
    groups = {status: StubGroup(status) for status in (200, 400, 500)}
    yield groups
    for group in groups.values():
        group.server.shutdown()
        group.server.server_close()


def test_requests_skip_unreachable_and_failing_groups(stubs: dict[int, StubGroup]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = GroupRouter([dead, stubs[500].url, stubs[200].url + "/"])
    for _ in range(3):  # round-robin starts at the dead group, then the failing one, then the live one
        status, body = router.forward("/v1/generate", b'{"prompt": "x"}')
        assert (status, body) == (200, {"text": "ok", "echo": '{"prompt": "x"}', "group": stubs[200].url})
    assert stubs[500].calls == 2 and stubs[200].calls == 3


def test_a_bad_request_is_answered_by_the_first_group_without_trying_the_others(stubs: dict[int, StubGroup]) -> None:
    router = GroupRouter([stubs[400].url, stubs[200].url])
    status, body = router.forward("/v1/generate", b"{}")
    assert status == 400 and "stub answers 400" in body["error"]
    assert stubs[200].calls == 0


def test_no_group_able_to_serve_is_a_503_naming_each_group(stubs: dict[int, StubGroup]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HttpError) as caught:
        GroupRouter([dead, stubs[500].url]).forward("/v1/generate", b"{}")
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert dead in str(caught.value) and f"{stubs[500].url}: HTTP 500" in str(caught.value)


def test_a_frontend_needs_a_group() -> None:
    with pytest.raises(ValueError, match="endpoints"):
        GroupRouter([])


def test_the_frontend_process_serves_without_importing_torch(tmp_path: Path) -> None:
    port, group = free_port(), f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-X", "importtime", "-m", "k2_workers.serve", "--frontend", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--endpoints", group]
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
