"""`k2 run` of a K2Serving on a real local Ray instance (2 CPUs) rebalancing its experts under skewed traffic: the
driver's EPLB loop scrapes the 4 rank actors' /metrics, plans with the EPLB controller's planner, hands the new
placement to each group's rank 0, every rank applies it live, and the ranks' own slot counters then measure a better
balance; no request fails meanwhile."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray.train  # noqa: F401  the test extra installs ray: a missing install fails here, never skips
import yaml

from k2_api.serving import K2Serving
from tests.support.ports import free_port
from tests.train.launch import base_env

from .run import K2_RUN
from .skew import worst_prompt
from .test_serve import EXAMPLE, READY, _wait_for_line
from .traffic import Traffic

pytestmark = pytest.mark.distributed

EPLB = {
    "enabled": True,
    "intervalSeconds": 3,
    "windowSeconds": 12,
    "cooldownSeconds": 30,  # outlasts the apply and a whole window after it: one placement measured at a time
    "minImprovement": 0.02,
    "maxMovesFraction": 1.0,  # one round reaches the target
}


class Records:
    """The JSON summary lines `k2 run --json` prints, read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.items: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.items.append(json.loads(line))

    def wait(self, what: str, found: Any, proc: subprocess.Popen[str], stderr: Path, timeout_s: float) -> Any:
        """The first record for which `found(record)` is true."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = next((r for r in list(self.items) if found(r)), None)
            if match is not None:
                return match
            assert proc.poll() is None, stderr.read_text()[-4000:]
            assert time.monotonic() < deadline, f"no {what}: {self.items[-3:]}"
            time.sleep(0.5)


def test_skewed_traffic_is_rebalanced_live_and_measured_better_with_zero_failed_requests(tmp_path: Path) -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["eplb"] = EPLB
    manifest = tmp_path / "k2serving.yaml"
    manifest.write_text(yaml.safe_dump(document))
    prompt, predicted_before = worst_prompt(K2Serving.model_validate(document))
    port = free_port()
    stderr = tmp_path / "serve.stderr"
    command = [
        *K2_RUN,
        "-f",
        str(manifest),
        "--json",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--cpus-per-worker",
        "0.5",
    ]
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, env=base_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    traffic = None
    try:
        records = Records(proc)
        _wait_for_line(stderr, proc, f"{READY}{port}", timeout_s=480)
        started = time.monotonic()
        traffic = Traffic(f"http://127.0.0.1:{port}/v1/completions", prompt)

        rebalanced = records.wait("rebalance", lambda r: r["reason"] == "Rebalanced", proc, stderr, timeout_s=240)
        generation = rebalanced["generation"]
        assert generation == 2 and rebalanced["movedExperts"] > 0, rebalanced
        before = rebalanced["measuredBalancedness"]
        assert before is not None and rebalanced["balancedness"] == pytest.approx(predicted_before, abs=0.05)
        applied = records.wait(
            "every rank on the new generation",
            lambda r: r["generation"] >= generation and r["appliedGeneration"] == r["generation"],
            proc,
            stderr,
            timeout_s=120,
        )
        assert applied["ranksBehind"] == [] and applied["groupsReady"] == 2, applied
        after = records.wait(
            "a window measured under the new placement",
            lambda r: (r["measuredGeneration"] or 0) >= generation,
            proc,
            stderr,
            timeout_s=120,
        )
        took = time.monotonic() - started
        traffic.stop()
        print(
            f"rebalance on Ray: generation {generation}, {rebalanced['movedExperts']} experts moved; balancedness "
            f"measured {before:.3f} -> {after['measuredBalancedness']:.3f}, predicted {rebalanced['balancedness']:.3f}"
            f" -> {rebalanced['predictedBalancedness']:.3f}; {took:.0f} s from the first request to the measurement;"
            f" {after['expertBytesIn']['peer'] - rebalanced['expertBytesIn']['peer']:.0f} expert bytes from peers;"
            f" {traffic.ok} requests answered, {len(traffic.failures)} failed"
        )
        assert after["measuredBalancedness"] > before, (rebalanced, after)
        assert traffic.failures == [] and traffic.ok > 0
        moved_in = {s: after["expertBytesIn"][s] - rebalanced["expertBytesIn"][s] for s in ("peer", "storage")}
        assert moved_in["peer"] > 0 and moved_in["storage"] == 0, moved_in  # every expert moved came from a peer
        assert after["requestsFailed"] == 0 and 0 < after["requestsServed"] <= traffic.ok

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, stderr.read_text()[-4000:]
    finally:
        if traffic is not None:
            traffic.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
