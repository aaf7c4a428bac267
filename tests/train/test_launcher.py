"""`k2 worker train --nproc-per-node N`: the in-pod launcher's env, preemption and failure handling."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2_api.contract import Env, ExitCodes
from k2_workers.train.checkpoint import complete_checkpoints
from k2_workers.train.cli import without_nproc_flag
from k2_workers.train.launcher import child_env, pod_exit_code

from .launch import MANIFEST, base_env


def test_child_env_numbers_ranks_by_node() -> None:
    pod = {"MASTER_ADDR": "train-0.svc", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "NODE_RANK": "1", "X": "y"}
    env = child_env(pod, nproc=4, local_rank=2, port=1234)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("6", "2", "8", "29500")
    assert env["X"] == "y"
    local = child_env({}, nproc=2, local_rank=1, port=1234)
    assert (local["MASTER_ADDR"], local["MASTER_PORT"], local["WORLD_SIZE"], local["RANK"]) == (
        "127.0.0.1",
        "1234",
        "2",
        "1",
    )
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        child_env({"WORLD_SIZE": "4", "NODE_RANK": "2"}, nproc=2, local_rank=0, port=1)


def test_the_nproc_flag_is_dropped_for_the_ranks() -> None:
    assert without_nproc_flag(["--nproc-per-node", "2", "--steps", "3", "--nproc-per-node=4"]) == ["--steps", "3"]


def test_the_pod_exit_code_tells_preemption_from_completion_and_crashes() -> None:
    P, S = ExitCodes.PREEMPTED, ExitCodes.SUCCEEDED
    assert pod_exit_code([S, S]) == S
    assert pod_exit_code([P, S]) == P  # one rank preempted, none crashed: the pod was preempted
    assert pod_exit_code([P, P]) == P
    assert pod_exit_code([P, None]) is None and pod_exit_code([S, None]) is None  # wait for the others
    assert pod_exit_code([None, 1]) == 1  # a crash decides at once
    assert pod_exit_code([P, 1]) == 1 and pod_exit_code([-9, P]) == 137  # killed by SIGKILL


def _start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "k2_workers.train", "--nproc-per-node", "2", "--config", str(MANIFEST), *args]
    out = open(tmp_path / "out", "w")  # noqa: SIM115 (closed with the process)
    err = open(tmp_path / "err", "w")  # noqa: SIM115
    env = base_env() | {Env.TERMINATION_LOG: str(tmp_path / "termination-log")}
    return subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)


def _wait_for_step(tmp_path: Path, proc: subprocess.Popen[str], step: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = (tmp_path / "out").read_text().splitlines()
        if lines and json.loads(lines[-1])["step"] >= step:
            return
        assert proc.poll() is None, (tmp_path / "err").read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.distributed
def test_sigterm_to_the_launcher_checkpoints_and_exits_preempted(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--steps", "100000", "--checkpoint-dir", str(tmp_path / "ckpt"))
    try:
        _wait_for_step(tmp_path, proc, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == ExitCodes.PREEMPTED, (tmp_path / "err").read_text()[-3000:]
    finally:
        proc.kill()
    last = json.loads((tmp_path / "out").read_text().splitlines()[-1])["step"]
    step, path = complete_checkpoints(tmp_path / "ckpt")[-1]
    assert step == last
    assert (tmp_path / "termination-log").read_text() == f"preempted at step {last}, checkpoint {path}"


@pytest.mark.distributed
def test_a_failed_rank_fails_the_launcher(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--steps", "100000", "--pg-timeout", "10")
    try:
        _wait_for_step(tmp_path, proc, 2)
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        subprocess.run(["kill", "-KILL", str(ranks[1])], check=True)
        assert proc.wait(timeout=90) == 137  # the killed rank's code, as a shell reports it
    finally:
        proc.kill()
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("local rank 1: killed by SIGKILL; local rank 0: "), message  # the cause first
