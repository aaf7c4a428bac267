"""A gang whose ranks do not share the checkpoint directory (an emptyDir per pod) trains without checkpoints.

Two real ranks, each given its own `--checkpoint-dir` (what two pods with an emptyDir each see), against the same
directory for both (a shared volume): the first completes with checkpoints off and a warning on every rank, the
second writes checkpoints as before.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from k2_api.contract import ExitCodes
from k2_workers.train.checkpoint import NOT_SHARED_REASON, complete_checkpoints
from tests.support.ports import free_port

from .launch import MANIFEST, WORKER, base_env, step_lines, wait_for_step

pytestmark = pytest.mark.distributed

WARNING = "is not shared by the gang's ranks"


def _start(checkpoint_dirs: list[Path], args: list[str], log_dir: Path) -> list[subprocess.Popen[str]]:
    """One worker per rank, as in K2Training pods, rank r with checkpoint_dirs[r]."""
    port = str(free_port())
    procs = []
    for rank, directory in enumerate(checkpoint_dirs):
        env = base_env() | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(len(checkpoint_dirs)),
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "NODE_RANK": str(rank),
        }
        command = [*WORKER, "--config", str(MANIFEST), "--checkpoint-dir", str(directory), *args]
        stdout = open(log_dir / f"rank{rank}.out", "w")  # noqa: SIM115 (closed with the process)
        stderr = open(log_dir / f"rank{rank}.err", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, text=True))
    return procs


def _kill(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait(procs: list[subprocess.Popen[str]], timeout_s: float = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout_s) for p in procs]
    finally:
        _kill(procs)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def test_ranks_with_separate_directories_train_to_the_end_without_checkpoints(tmp_path: Path) -> None:
    dirs = [tmp_path / "pod0", tmp_path / "pod1"]
    codes = _wait(_start(dirs, ["--steps", "6"], tmp_path))  # the manifest checkpoints every 5 steps
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [ExitCodes.SUCCEEDED] * 2, errs[0][-4000:] + errs[1][-4000:]
    assert [r["step"] for r in step_lines((tmp_path / "rank0.out").read_text())] == list(range(1, 7))
    for rank, err in enumerate(errs):
        assert err.count(WARNING) == 1, err[-4000:]
        assert f"the checkpoint directory {dirs[rank]} {WARNING}" in err
        assert "set spec.checkpointing.claimName or uri" in err
        assert "checkpoint written" not in err
    assert [_entries(d) for d in dirs] == [[], []]  # no checkpoint, no probe left behind


def test_sigterm_without_shared_checkpoints_exits_preempted_with_no_checkpoint(tmp_path: Path) -> None:
    dirs = [tmp_path / "pod0", tmp_path / "pod1"]
    procs = _start(dirs, ["--steps", "100000"], tmp_path)
    try:
        wait_for_step(tmp_path / "rank0.out", 3, procs)
    except AssertionError:
        _kill(procs)
        raise
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = _wait(procs, 120)
    assert codes == [ExitCodes.PREEMPTED] * 2, (tmp_path / "rank0.err").read_text()[-4000:]
    assert "checkpoint none" in (tmp_path / "rank0.err").read_text()
    assert [_entries(d) for d in dirs] == [[], []]


def test_ranks_sharing_a_directory_checkpoint_as_before(tmp_path: Path) -> None:
    shared = tmp_path / "ckpt"
    codes = _wait(_start([shared, shared], ["--steps", "6"], tmp_path))
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [ExitCodes.SUCCEEDED] * 2, errs[0][-4000:]
    assert all(WARNING not in err for err in errs)
    assert [s for s, _ in complete_checkpoints(shared)] == [5, 6]
    assert _entries(shared) == ["step-5", "step-6"]  # the probe is cleaned up


def test_the_reason_names_the_directory_and_the_fix() -> None:
    reason = NOT_SHARED_REASON.format(root="/checkpoints")
    assert reason == (
        "the checkpoint directory /checkpoints is not shared by the gang's ranks (an emptyDir per pod?): "
        "checkpoints are off for this run; set spec.checkpointing.claimName or uri to keep them"
    )
