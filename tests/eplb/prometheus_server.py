"""A real Prometheus (Debian package) started on 127.0.0.1 for tests, scraping file-discovered loopback targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

PROMETHEUS = Path("/usr/bin/prometheus")


class Prometheus:
    """A running server; `set_targets` rewrites the file-SD file that Prometheus watches."""

    def __init__(self, directory: Path, port: int, process: subprocess.Popen[bytes]):
        self.directory = directory
        self.port = port
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def set_targets(self, targets: Sequence[str], labels: Mapping[str, str]) -> None:
        for target in targets:
            assert target.startswith("127.0.0.1:"), target
        path = self.directory / "targets.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": list(targets), "labels": dict(labels)}]))
        tmp.replace(path)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The value of a query that yields one sample, None when it yields none."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
        """Poll `condition`; fail the test if it does not hold within `timeout` seconds."""
        wait_for(f"prometheus: {what}", condition, timeout)


CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
scrape_configs:
  - job_name: k2-serving
    file_sd_configs:
      - files: [{targets}]
        refresh_interval: 1s
"""


@contextmanager
def running_prometheus(directory: Path) -> Iterator[Prometheus]:
    """Start Prometheus in `directory` (config, targets, TSDB); skip the test when the package is missing."""
    if not PROMETHEUS.exists() and shutil.which("prometheus") is None:
        skip_or_fail("prometheus is not installed (Debian package `prometheus`, /usr/bin/prometheus)")
    binary = str(PROMETHEUS) if PROMETHEUS.exists() else str(shutil.which("prometheus"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "targets.json").write_text("[]")
    (directory / "prometheus.yml").write_text(CONFIG.format(targets=json.dumps(str(directory / "targets.json"))))
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(directory, port, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                output = (directory / "prometheus.log").read_text()
                pytest.fail(f"prometheus exited with {process.returncode}: {output}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus did not become ready within 30s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
