import datetime
import http.server
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prometheus_client import generate_latest

from k2_workers.incluster import InClusterClient
from k2_workers.train.metrics import TrainMetrics
from k2_workers.train.status import StatusReporter, progress_record, progress_sender, reporter_from_env


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, str, Any]]] = []

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, self.headers["Content-Type"], self.headers["Authorization"], body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[tuple[str, list[tuple[str, str, str, Any]]]]:
    _Recorder.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.received
    server.shutdown()


def test_progress_is_merge_patched_into_the_status_subresource(api_server: Any, tmp_path: Path) -> None:
    base, received = api_server
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    client = InClusterClient(server=base, namespace="ns1", token_file=token, ca_file=None)
    reporter = StatusReporter(progress_sender(client, "run1"), min_interval_s=0)
    now = datetime.datetime(2026, 11, 23, 1, 2, 3, tzinfo=datetime.UTC)
    reporter.report(progress_record(7, 2.5, 1234.56, 12.3456789, "/checkpoints/step-5", 5, now))
    reporter.close()
    path, content_type, auth, body = received[-1]
    assert path == "/apis/k2.ai/v1alpha1/namespaces/ns1/k2trainings/run1/status"
    assert content_type == "application/merge-patch+json" and auth == "Bearer secret-token"
    assert body == {
        "status": {
            "progress": {
                "step": 7,
                "loss": 2.5,
                "tokensPerSecond": 1234.6,
                "maxAttentionLogit": 12.3457,
                "lastCheckpoint": "/checkpoints/step-5",
                "lastCheckpointStep": 5,
                "updatedAt": "2026-11-23T01:02:03Z",
                "checkpointFallback": None,  # sent as null: a clean resume clears an earlier attempt's record
            }
        }
    }


def test_reports_are_throttled_to_the_latest_and_forced_ones_go_at_once() -> None:
    sent: list[dict[str, Any]] = []
    reporter = StatusReporter(sent.append, min_interval_s=3600)
    for step in range(1, 6):
        reporter.report({"step": step})
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    for step in range(6, 9):
        reporter.report({"step": step})
    reporter.report({"step": 9}, force=True)
    reporter.close()
    assert sent[0]["step"] in (1, 2, 3, 4, 5)
    assert sent[-1] == {"step": 9} and len(sent) <= 3


def test_a_failing_api_server_never_raises_into_training() -> None:
    def fail(progress: dict[str, Any]) -> None:
        raise OSError("connection refused")

    reporter = StatusReporter(fail, min_interval_s=0)
    reporter.report({"step": 1}, force=True)
    reporter.close()


def test_outside_a_cluster_reporting_is_off() -> None:
    assert reporter_from_env({}) is None
    assert reporter_from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None  # K2Training name unknown


def test_metrics_record_a_step() -> None:
    metrics = TrainMetrics("run1", port=0)
    record = {"step": 3, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 100.0, "max_attn_logit": 5.0, "clipped_heads": 2}
    metrics.observe_step({**record, "grad_norm": 0.5}, num_tokens=512, expert_counts=[[3, 0], [1, 2]])
    metrics.observe_checkpoint(3)
    text = generate_latest(metrics.registry).decode()
    assert 'k2_train_step{training="run1"} 3.0' in text
    assert 'k2_train_tokens_total{training="run1"} 512.0' in text
    assert 'k2_train_expert_tokens_total{expert="0",layer="0",training="run1"} 3.0' in text
    assert 'expert="1",layer="0"' not in text
    assert 'k2_train_last_checkpoint_step{training="run1"} 3.0' in text


def test_metrics_are_served_on_a_port() -> None:
    metrics = TrainMetrics("run2", port=-1, addr="127.0.0.1")
    try:
        metrics.observe_checkpoint(40)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    assert 'k2_train_last_checkpoint_step{training="run2"} 40.0' in text
