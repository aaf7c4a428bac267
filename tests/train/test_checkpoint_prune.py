"""Deleting checkpoints is atomic: a process killed while pruning never leaves a complete-looking directory with files
missing, and the next start removes what the crash left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_workers.train.checkpoint import CheckpointManager, complete_checkpoints
from k2_workers.train.checkpoint_files import COMPLETE_MARKER, read_marker

REPO = Path(__file__).parents[2]


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters())


def _stop_inside_the_first_deletion(ready: Path) -> None:
    """After the first file removed from a directory that still holds its COMPLETE marker: say so, then wait to be
    killed (the deterministic crash point: files gone, marker not yet)."""
    real_unlink = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)
        if os.path.basename(path) == COMPLETE_MARKER:
            return
        marker = COMPLETE_MARKER if dir_fd is not None else os.path.join(os.path.dirname(path), COMPLETE_MARKER)
        try:
            os.stat(marker, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        ready.write_text(str(path))
        time.sleep(600)

    os.unlink = unlink  # type: ignore[assignment]


def _child(root: Path, ready: Path) -> None:
    """Checkpoints 10 and 20 with keepLast 2, then 30, whose pruning of step 10 is where the process gets killed."""
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(root, keep_last=2)
    manager.save(10, model, optimizer, {})
    manager.save(20, model, optimizer, {})
    _stop_inside_the_first_deletion(ready)
    manager.save(30, model, optimizer, {})


def _assert_every_complete_looking_checkpoint_is_complete(root: Path) -> None:
    for _, path in complete_checkpoints(root):
        listed = read_marker(path)["files"]
        present = {f.name: f.stat().st_size for f in path.iterdir()}
        assert {name: entry["bytes"] for name, entry in listed.items()}.items() <= present.items(), path


def test_a_process_killed_while_pruning_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    command = [sys.executable, "-m", "tests.train.test_checkpoint_prune", str(root), str(ready)]
    child = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never reached the deletion"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    _assert_every_complete_looking_checkpoint_is_complete(root)
    assert [s for s, _ in complete_checkpoints(root)] == [20, 30]  # step 10 was being deleted: it is gone
    leftovers = [p.name for p in root.iterdir() if not p.name.startswith("step-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".deleting-step-10")

    # the next start (restore, on rank 0) removes what the crash left behind, and resumes the newest
    model, optimizer = _model_and_optimizer()
    resumed = CheckpointManager(root, keep_last=2).restore(model, optimizer)
    assert resumed.path == root / "step-30" and resumed.skipped == ()
    assert sorted(p.name for p in root.iterdir()) == ["step-20", "step-30"]


def test_stale_temporary_and_deleting_directories_are_removed_on_start(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path)
    manager.save(5, model, optimizer, {})
    for stale in ("step-9.tmp", ".deleting-step-3-0a1b", "step-4.corrupt-1700000000"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "tensors.safetensors").write_bytes(b"x")
    manager.restore(model, optimizer)
    # the set-aside corrupt checkpoint stays for a person to inspect; the rest was garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4.corrupt-1700000000", "step-5"]


def test_replacing_a_checkpoint_of_the_same_step_never_deletes_it_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path)
    manager.save(5, model, optimizer, {"attempt": 1})
    removed: list[str] = []
    real_rmtree = shutil.rmtree

    def rmtree(path: str | Path, *args: Any, **kwargs: Any) -> None:
        removed.append(Path(path).name)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    manager.save(5, model, optimizer, {"attempt": 2})
    assert removed and all(name.startswith(".deleting-step-5") for name in removed), removed
    assert manager.load(tmp_path / "step-5", model, optimizer).extra == {"attempt": 2}


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
