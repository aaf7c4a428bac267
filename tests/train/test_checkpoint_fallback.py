"""A corrupt or partial newest checkpoint: resume falls back to the previous complete one and says why."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_workers.train import loop
from k2_workers.train.checkpoint import CheckpointManager, complete_checkpoints
from k2_workers.train.checkpoint_files import COMPLETE_MARKER
from k2_workers.train.config import RunConfig
from k2_workers.train.loop import train
from k2_workers.train.status import StatusReporter

from .launch import launch_ranks, step_lines


def _run(checkpoint_dir: Path, **overrides: Any) -> list[dict[str, Any]]:
    values: dict[str, Any] = {"seq_len": 32, "micro_batch_size": 2, "warmup_steps": 1, "decay_steps": 2}
    cfg = RunConfig(**(values | {"device": "cpu", "checkpoint_dir": str(checkpoint_dir)} | overrides))
    out = io.StringIO()
    assert train(cfg, out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _biggest_file(path: Path) -> Path:
    return max((f for f in path.iterdir() if f.name != COMPLETE_MARKER), key=lambda f: f.stat().st_size)


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every status.progress the trainer's reporter sends (as in a pod, without the API server)."""
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(loop, "reporter_from_env", lambda min_interval_s: StatusReporter(sent.append, 0))
    return sent


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_truncated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reported: list[dict[str, Any]]
) -> None:
    ckpt = tmp_path / "ckpt"
    first = _run(ckpt, steps=6, stop_after=4, checkpoint_every=2, keep_last=3)
    assert [s for s, _ in complete_checkpoints(ckpt)] == [2, 4]
    assert reported and all(p["checkpointFallback"] is None for p in reported)  # nothing was skipped
    reported.clear()
    shard = _biggest_file(ckpt / "step-4")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    with caplog.at_level(logging.INFO, logger="k2_workers.train"):
        resumed = _run(ckpt, steps=6, checkpoint_every=2, keep_last=3)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert [r["loss"] for r in resumed[:2]] == [r["loss"] for r in first[2:4]]  # exactly where step 2 left off
    warning = next(r.getMessage() for r in caplog.records if "fallback" in r.getMessage())
    assert "step-4" in warning and shard.name in warning and "step 2" in warning
    # the unusable one was moved aside (kept for inspection, never resumed or counted for keepLast again)
    assert [p.name.split(".")[0] for p in ckpt.glob("step-4.corrupt-*")] == ["step-4"]
    assert [s for s, _ in complete_checkpoints(ckpt)] == [2, 4, 6]
    # status.progress says so, for the operator's CheckpointFallback condition and Warning event
    fallback = reported[0]["checkpointFallback"]
    assert fallback is not None and (fallback["resumedFrom"], fallback["resumedStep"]) == (str(ckpt / "step-2"), 2)
    [skipped] = fallback["skipped"]
    assert skipped["step"] == 4 and skipped["path"] == str(ckpt / "step-4") and shard.name in skipped["reason"]
    assert all(p["checkpointFallback"] == fallback for p in reported)


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _truncate(path: Path) -> str:
    shard = path / "tensors.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    return "tensors.safetensors"


def _delete_shard(path: Path) -> str:
    (path / "tensors.safetensors").unlink()
    return "tensors.safetensors"


def _flip_a_byte_of(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def _flip_a_byte(path: Path) -> str:
    _flip_a_byte_of(path / "tensors.safetensors")
    return "SHA-256"


def _garbage_marker(path: Path) -> str:
    (path / COMPLETE_MARKER).write_text("{not json")
    return COMPLETE_MARKER


def _garbage_extras(path: Path) -> str:
    (path / "extra.rank0.json").write_text("[]")
    return "extra.rank0.json"


@pytest.mark.parametrize(
    "corrupt", [_truncate, _delete_shard, _flip_a_byte, _garbage_marker, _garbage_extras], ids=lambda f: f.__name__
)
def test_restore_skips_a_corrupt_newest_checkpoint_and_reports_it(
    tmp_path: Path, corrupt: Callable[[Path], str]
) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    good, good_optimizer = _model_and_optimizer(0)
    manager.save(10, good, good_optimizer, {"data": 10})
    newer, newer_optimizer = _model_and_optimizer(1)
    newest = manager.save(20, newer, newer_optimizer, {"data": 20})
    expected_words = corrupt(newest)

    model, optimizer = _model_and_optimizer(2)
    resumed = manager.restore(model, optimizer)
    assert resumed.path == tmp_path / "step-10" and resumed.state is not None and resumed.state.step == 10
    assert resumed.state.extra == {"data": 10}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), good.parameters(), strict=True))
    [skipped] = resumed.skipped
    assert skipped.step == 20 and skipped.path == str(newest) and expected_words in skipped.reason
    status = resumed.status()
    assert status is not None and status["resumedFrom"] == str(tmp_path / "step-10")
    assert status["resumedStep"] == 10 and status["skipped"] == [
        {"step": 20, "path": str(newest), "reason": skipped.reason}
    ]
    assert not newest.exists() and [s for s, _ in complete_checkpoints(tmp_path)] == [10]


def test_restore_starts_from_zero_when_no_checkpoint_is_usable_and_says_so(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    model, optimizer = _model_and_optimizer(0)
    _delete_shard(manager.save(5, model, optimizer, {}))
    resumed = manager.restore(model, optimizer)
    assert resumed.path is None and resumed.state is None
    assert [s.step for s in resumed.skipped] == [5]
    status = resumed.status()
    assert status is not None and status["resumedStep"] is None


def test_restore_of_intact_checkpoints_reports_no_fallback(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    assert manager.restore(*_model_and_optimizer(0)).path is None  # nothing there: a fresh start, no fallback
    manager.save(5, *_model_and_optimizer(0), {})
    resumed = manager.restore(*_model_and_optimizer(1))
    assert resumed.path == tmp_path / "step-5" and resumed.skipped == () and resumed.status() is None


def test_a_checkpoint_of_another_model_raises_instead_of_falling_back(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(5, *_model_and_optimizer(0), {})
    other = torch.nn.Linear(4, 5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        manager.restore(other, torch.optim.AdamW(other.parameters()))
    assert (tmp_path / "step-5").is_dir()  # a configuration error: the checkpoint is not moved aside


@pytest.mark.distributed
def test_all_ranks_fall_back_when_only_one_rank_cannot_read_its_expert_shard(tmp_path: Path) -> None:
    ep = ["--steps", "30", "--expert-parallel", "2", "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path)]
    first = launch_ranks([*ep, "--stop-after", "4"])
    assert first.returncode == 0, first.stderr[-4000:]
    shard = tmp_path / "step-4" / "tensors.ep1of2.safetensors"  # only rank 1 reads it
    _flip_a_byte_of(shard)

    resumed = launch_ranks([*ep, "--stop-after", "6"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    lines = step_lines(resumed.stdout)
    assert [r["step"] for r in lines] == [3, 4, 5, 6]  # both ranks went back to step 2, not only rank 1
    assert lines[0]["loss"] == pytest.approx(step_lines(first.stdout)[2]["loss"], rel=1e-5)
    assert "checkpoint fallback" in resumed.stderr and f"rank 1: {shard}" in resumed.stderr
