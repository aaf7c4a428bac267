"""A real `k2 worker train` process serves step time and throughput on /metrics (what the PodMonitor scrapes), under
the names of `k2_api.contract.TrainingMetrics`, on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from k2_api.contract import Env, ExitCodes, MetricLabels, TrainingMetrics
from k2_workers.train.config import load_manifest
from tests.support.ports import free_port
from tests.train.launch import MANIFEST, base_env

SPEC = load_manifest(MANIFEST)
NAME = SPEC["metadata"]["name"]
TOKENS_PER_STEP = SPEC["spec"]["data"]["batchSize"] * SPEC["spec"]["data"]["seqLen"]  # one rank


def _scrape(port: int) -> dict[str, float] | None:
    """Sample name -> value of the training's /metrics (None while the server is not up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get(MetricLabels.TRAINING) == NAME and MetricLabels.EXPERT not in sample.labels
    }


def test_a_training_process_serves_step_time_and_tokens_per_second(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "k2_workers.train", "--config", str(MANIFEST), "--json"]
    command += ["--steps", "400", "--metrics-port", str(port)]
    env = {**base_env(), Env.LISTEN_HOST: "127.0.0.1"}
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        deadline = time.monotonic() + 180
        samples: dict[str, float] | None = None
        while time.monotonic() < deadline and process.poll() is None:
            samples = _scrape(port)
            if samples and samples.get(TrainingMetrics.STEP.name, 0) >= 3:
                break
            time.sleep(0.2)
        assert samples is not None and samples.get(TrainingMetrics.STEP.name, 0) >= 3, log.read_text()[-2000:]
    finally:
        process.send_signal(signal.SIGTERM)  # preempted: checkpoints nowhere here, exits PREEMPTED
        process.wait(timeout=120)
    assert process.returncode == ExitCodes.PREEMPTED, log.read_text()[-2000:]
    assert samples[TrainingMetrics.STEPS.name] == 400
    assert 0 < samples[TrainingMetrics.STEP_SECONDS.name] < 60
    assert samples[TrainingMetrics.TOKENS_PER_SECOND.name] > 0
    # the token counter grows by one batch a step (a scrape may land between the step gauge and the counter)
    tokens, step = samples[TrainingMetrics.TOKENS.name], samples[TrainingMetrics.STEP.name]
    assert tokens % TOKENS_PER_STEP == 0 and step - 1 <= tokens / TOKENS_PER_STEP <= step
