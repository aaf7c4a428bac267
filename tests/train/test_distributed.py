"""Multi-process training on CPU (gloo): resume exactness, learning, preemption and rank failure."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from k2_api.contract import ExitCodes
from k2_workers.train.checkpoint import complete_checkpoints
from k2_workers.train.config import load_manifest, resolve_config
from k2_workers.train.loop import build_schedule
from tests.support.listeners import LOOPBACK_HEX, listening_addresses

from .launch import MANIFEST, launch_ranks, start_ranks, step_lines, torchrun, wait_for_step

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The acceptance command: torchrun, 2 ranks, the example K2Training, --steps 30."""
    checkpoints = tmp_path_factory.mktemp("straight")
    result = torchrun(["--steps", "30", "--checkpoint-dir", str(checkpoints)])
    assert result.returncode == 0, result.stderr[-4000:]
    return step_lines(result.stdout)


def test_rank0_prints_one_json_line_per_step(straight_run: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in straight_run] == list(range(1, 31))
    keys = {"step", "loss", "lr", "tokens_per_s", "max_attn_logit", "clipped_heads", "grad_norm"}
    assert all(keys <= r.keys() for r in straight_run)
    schedule = build_schedule(resolve_config(load_manifest(MANIFEST), {"steps": 30}))
    assert [r["lr"] for r in straight_run] == pytest.approx([schedule(s) for s in range(1, 31)], rel=1e-12)
    assert straight_run[-1]["lr"] == pytest.approx(schedule.min_lr) and schedule.min_lr < schedule.peak_lr


def test_loss_falls_well_over_ten_percent_in_30_steps(straight_run: list[dict[str, Any]]) -> None:
    first = sum(r["loss"] for r in straight_run[:3]) / 3
    last = sum(r["loss"] for r in straight_run[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_20_steps_plus_a_resumed_10_equal_30_straight(straight_run: list[dict[str, Any]], tmp_path: Path) -> None:
    # --stop-after keeps the schedule of a 30-step run (its decay covers steps 21..30)
    first = launch_ranks(["--steps", "30", "--stop-after", "20", "--checkpoint-dir", str(tmp_path)])
    assert first.returncode == 0, first.stderr[-4000:]
    assert [s for s, _ in complete_checkpoints(tmp_path)][-1] == 20
    resumed = launch_ranks(["--steps", "30", "--checkpoint-dir", str(tmp_path)])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    lines = step_lines(resumed.stdout)
    assert [r["step"] for r in lines] == list(range(21, 31))
    assert lines[-1]["loss"] == pytest.approx(straight_run[-1]["loss"], rel=1e-4)
    assert lines[0]["lr"] == pytest.approx(straight_run[20]["lr"], rel=1e-12)


def _stop(procs: list[subprocess.Popen[str]], timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return codes


def test_sigterm_finishes_the_step_checkpoints_and_exits_preempted(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    # --checkpoint-every 0: the manifest's periodic checkpoints (every 5 steps) would race the signal
    args = ["--steps", "100000", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "0"]
    procs = start_ranks(args, 2, tmp_path)
    try:
        wait_for_step(tmp_path / "rank0.out", 3, procs)
        listeners = listening_addresses(*(p.pid for p in procs))
        assert listeners and listeners <= LOOPBACK_HEX, listeners  # the gang's store and gloo: loopback only
        for p in procs:
            p.send_signal(signal.SIGTERM)
    finally:
        codes = _stop(procs, 120)
    assert codes == [ExitCodes.PREEMPTED] * 2, (tmp_path / "rank0.err").read_text()[-4000:]  # not completion
    last_step = step_lines((tmp_path / "rank0.out").read_text())[-1]["step"]
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [last_step]
    assert not list(checkpoints.glob("*.tmp"))


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_when_a_rank_dies_or_hangs_the_others_exit_nonzero_within_the_timeout(
    failure: signal.Signals, tmp_path: Path
) -> None:
    timeout_s = 10  # --pg-timeout: a hung peer is detected by the collective timeout, a dead one at once
    procs = start_ranks(["--steps", "100000", "--pg-timeout", str(timeout_s)], 2, tmp_path)
    try:
        wait_for_step(tmp_path / "rank0.out", 3, procs)
        procs[1].send_signal(failure)
        failed_at = time.monotonic()
        procs[0].wait(timeout=timeout_s + 50)
        elapsed = time.monotonic() - failed_at
    finally:
        procs[1].send_signal(signal.SIGKILL)
        codes = _stop(procs, 1)
    assert codes[0] not in (0, None), codes
    assert elapsed < timeout_s + 50


def test_expert_parallel_training_matches_data_parallel_and_resumes_exactly(
    straight_run: list[dict[str, Any]], tmp_path: Path
) -> None:
    """expertParallel 2: each rank holds 4 of the 8 experts per layer, tokens travel by all-to-all."""
    ep = ["--steps", "30", "--expert-parallel", "2"]
    straight = launch_ranks([*ep, "--stop-after", "8", "--checkpoint-dir", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr[-4000:]
    lines = step_lines(straight.stdout)
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert lines[0]["grad_norm"] == pytest.approx(straight_run[0]["grad_norm"], rel=1e-5)
    for ep_line, dp_line in zip(lines, straight_run[:8], strict=True):  # same maths, other summation order
        assert ep_line["loss"] == pytest.approx(dp_line["loss"], rel=2e-3)

    split = tmp_path / "b"
    first = launch_ranks([*ep, "--stop-after", "4", "--checkpoint-dir", str(split)])
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = launch_ranks([*ep, "--stop-after", "8", "--checkpoint-dir", str(split)])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    resumed_lines = step_lines(resumed.stdout)
    assert resumed_lines[0]["step"] == 5
    assert resumed_lines[-1]["loss"] == pytest.approx(lines[-1]["loss"], rel=1e-5)
