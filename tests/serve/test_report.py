"""The applied-generation report against a local HTTP server standing in for the API server: patches that fail are
retried until one lands, and when newer generations are applied meanwhile the newest is the one that lands last."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from k2_api.contract import Annotations
from k2_workers.incluster import InClusterClient
from k2_workers.serve.report import AppliedGenerationReporter, next_backoff
from tests.support.waits import wait_for


class FlakyApiServer:
    """Answers `fail_next` PATCHes with 503, then 200; records (status, annotation value) of each PATCH."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.patches: list[tuple[int, str]] = []
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 503 if owner.fail_next > 0 else 200
                owner.fail_next -= status == 503
                owner.patches.append((status, body["metadata"]["annotations"][Annotations.APPLIED_GENERATION]))
                owner.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def landed(self) -> list[str]:
        return [value for status, value in self.patches if status == 200]


@pytest.fixture
def api() -> Iterator[FlakyApiServer]:
    server = FlakyApiServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


def reporter_for(api: FlakyApiServer) -> AppliedGenerationReporter:
    client = InClusterClient(f"http://127.0.0.1:{api.server.server_port}", "ns", None, None)
    return AppliedGenerationReporter(client, "rank-0", first_retry_s=0.05, max_retry_s=0.2)


def test_a_failed_report_is_retried_until_it_lands(api: FlakyApiServer) -> None:
    api.fail_next = 3
    reporter = reporter_for(api)
    reporter.report(1)
    wait_for("generation 1 to land", lambda: api.landed == ["1"])
    assert api.patches == [(503, "1"), (503, "1"), (503, "1"), (200, "1")]
    assert api.paths == ["/api/v1/namespaces/ns/pods/rank-0"] * 4
    assert reporter.reported == 1


def test_the_newest_generation_lands_last(api: FlakyApiServer) -> None:
    reporter = reporter_for(api)
    reporter.report(1)
    wait_for("generation 1 to land", lambda: reporter.reported == 1)
    api.fail_next = 1_000_000  # the API server is down while generations 2 and 3 are applied
    reporter.report(2)
    wait_for("a failed patch of generation 2", lambda: (503, "2") in api.patches)
    reporter.report(3)
    wait_for("generation 3 tried", lambda: (503, "3") in api.patches)
    api.fail_next = 0
    wait_for("generation 3 to land", lambda: reporter.reported == 3)
    assert api.landed[0] == "1" and api.landed[-1] == "3"
    assert api.patches.index((503, "3")) > max(i for i, p in enumerate(api.patches) if p[1] == "2")


def test_backoff_doubles_up_to_its_bound() -> None:
    assert [next_backoff(s, 4.0) for s in (0.5, 1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0, 4.0]


def test_outside_a_cluster_nothing_is_sent() -> None:
    reporter = AppliedGenerationReporter(None, "rank-0")
    reporter.report(5)
    assert not reporter.enabled and reporter.reported is None
