"""`k2 run` of a K2Serving on a real local Ray instance (2 CPUs): the example's 2 groups x 2 ranks, each group a
placement group of rank actors running the pods' engine, behind the pods' frontend on 127.0.0.1. A killed rank
actor's group is re-formed while clients keep sending, and not one of their requests fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import ray.train  # noqa: F401  the test extra installs ray: a missing install fails here, never skips

from tests.support.listeners import LOOPBACK_HEX, listening_addresses
from tests.support.ports import free_port
from tests.train.launch import base_env

from .run import K2_RUN, actor_pids
from .traffic import Traffic

pytestmark = pytest.mark.distributed

EXAMPLE = Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml"
READY = "frontend on http://127.0.0.1:"
RANK_ACTOR = "ray::RankActor"


def _wait_for_line(stderr: Path, proc: subprocess.Popen[str], text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in stderr.read_text():
        assert proc.poll() is None, stderr.read_text()[-4000:]
        assert time.monotonic() < deadline, stderr.read_text()[-4000:]
        time.sleep(0.5)


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        answer: dict[str, object] = json.loads(response.read())
        return answer


def test_the_example_serves_on_loopback_re_forms_a_group_whose_rank_died_and_stops_on_sigint(tmp_path: Path) -> None:
    port = free_port()
    stderr = tmp_path / "serve.stderr"
    command = [*K2_RUN, "-f", str(EXAMPLE), "--port", str(port), "--num-cpus", "2", "--cpus-per-worker", "0.5"]
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, env=base_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        _wait_for_line(stderr, proc, f"{READY}{port}", timeout_s=480)
        listeners = listening_addresses(proc.pid)
        assert listeners and listeners <= LOOPBACK_HEX, listeners  # Ray, ranks, stores, frontend: loopback only
        completions = f"http://127.0.0.1:{port}/v1/completions"
        answers = [_post(completions, {"prompt": f"hello {i}", "max_tokens": 4}) for i in range(4)]
        for answer in answers:
            choices = answer["choices"]
            assert isinstance(choices, list) and choices and isinstance(choices[0]["text"], str)

        ranks = actor_pids(proc, RANK_ACTOR)
        assert len(ranks) == 4  # 2 groups x 2 ranks
        traffic = Traffic(completions, "during")  # clients across the kill and the re-forming: none may fail
        try:
            time.sleep(2)
            os.kill(ranks[-1], signal.SIGKILL)
            _wait_for_line(stderr, proc, "a rank ended; re-forming the group", timeout_s=60)
            _wait_for_line(stderr, proc, "re-formed, serving again", timeout_s=480)
            time.sleep(2)
        finally:
            traffic.stop()
        assert traffic.failures == [] and traffic.ok > 0, traffic.failures[:5]
        for i in range(4):
            _post(completions, {"prompt": f"after {i}", "max_tokens": 4})
        assert len(actor_pids(proc, RANK_ACTOR)) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, stderr.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
