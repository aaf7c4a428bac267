"""Launching training workers in tests: under torchrun, or as separate ranks with the env the operator sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

# The acceptance command runs the example users apply; tests/train/k2training-test.yaml is the fallback.
EXAMPLE = Path(__file__).parents[2] / "examples" / "k2training-debug.yaml"
MANIFEST = EXAMPLE if EXAMPLE.is_file() else Path(__file__).parent / "k2training-test.yaml"
WORKER = [sys.executable, "-m", "k2_workers.train"]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "MASTER_ADDR",
        "MASTER_PORT",
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "KUBERNETES_SERVICE_HOST",
    ):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    return env


def torchrun(
    args: list[str], nproc: int = 2, timeout_s: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """torchrun --standalone (rendezvous on localhost) with the worker module; stdout holds rank 0's JSON lines.
    `env` is added to the ranks' environment (e.g. another OMP_NUM_THREADS). Only the torchrun-compatibility test
    uses it: torchrun's agent starts its store on every interface; the other tests use `launch_ranks`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["--master-addr=127.0.0.1", "-m", "k2_workers.train", "--config", str(MANIFEST), *args]
    return _run(command, timeout_s, env)


def launch_ranks(
    args: list[str], nproc: int = 2, timeout_s: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The workers' own launcher (`--nproc-per-node`, what a pod runs): `nproc` ranks on 127.0.0.1, whose rendezvous
    store listens there alone (torchrun's agent listens on every interface); stdout holds rank 0's JSON lines."""
    return _run([*WORKER, "--nproc-per-node", str(nproc), "--config", str(MANIFEST), *args], timeout_s, env)


def _run(command: list[str], timeout_s: float, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    environment = base_env() | (env or {})
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout_s, check=False)


def start_ranks(args: list[str], world_size: int, log_dir: Path) -> list[subprocess.Popen[str]]:
    """One process per rank with MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK, NODE_RANK, as in K2Training pods."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = base_env() | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": str(rank),
        }
        stdout = open(log_dir / f"rank{rank}.out", "w")  # noqa: SIM115 (closed with the process)
        stderr = open(log_dir / f"rank{rank}.err", "w")  # noqa: SIM115
        command = [*WORKER, "--config", str(MANIFEST), *args]
        procs.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True))
    return procs


def step_lines(text: str) -> list[dict[str, Any]]:
    """The JSON step records of a worker's stdout (every line must be one)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for_step(out_file: Path, step: int, procs: list[subprocess.Popen[str]], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in out_file.read_text().splitlines() if line.strip()]
        if lines and json.loads(lines[-1])["step"] >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited early: {[p.returncode for p in procs]}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")
