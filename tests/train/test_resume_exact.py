"""Exact resume: a run stopped anywhere and resumed from a checkpoint ends with the weights and optimizer state of
an uninterrupted run with the same seed, bit for bit (2 ranks on gloo, compared tensor by tensor).

What makes it exact: the seed fixes the initial weights and the data order (a pure function of the global sample
index, train/data.py); a checkpoint holds the model (router biases included), MuonClip's state (Muon momentum, AdamW
moments and step counts), the data position, the RNG states and the step (the learning rate follows from it); two
ranks' gloo all-reduce adds the same two numbers on every rank; and the CPU kernels' reduction order follows the
intra-op thread count, which a checkpoint records and a resumed run adopts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k2_workers.train.checkpoint import complete_checkpoints
from k2_workers.train.checkpoint_files import TENSORS_FILE, delete_dir

from .launch import launch_ranks, step_lines

pytestmark = pytest.mark.distributed

STEPS = 12
RUN = ["--steps", str(STEPS), "--checkpoint-every", "4"]


def _run(checkpoints: Path, *args: str, threads: int = 1) -> list[int]:
    """Two ranks of the test manifest with `threads` intra-op threads each; the steps rank 0 printed."""
    result = launch_ranks([*RUN, "--checkpoint-dir", str(checkpoints), *args], env={"OMP_NUM_THREADS": str(threads)})
    assert result.returncode == 0, result.stderr[-4000:]
    return [r["step"] for r in step_lines(result.stdout)]


def _final(checkpoints: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoints / f"step-{STEPS}" / TENSORS_FILE)


def _differing(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    assert expected.keys() == actual.keys()
    assert any(k.startswith("optim.") for k in expected)  # the optimizer state is compared too
    return [k for k in expected if not torch.equal(expected[k], actual[k])]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final model and optimizer tensors (1 thread per rank)."""
    checkpoints = tmp_path_factory.mktemp("straight")
    assert _run(checkpoints) == list(range(1, STEPS + 1))
    return _final(checkpoints)


def test_a_crash_resumed_from_an_older_checkpoint_ends_bitwise_identical(
    straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """The crash of a rank after step 7: the newest complete checkpoint is step 4, steps 5..7 are trained again."""
    assert _run(tmp_path, "--stop-after", "7") == list(range(1, 8))
    delete_dir(tmp_path / "step-7")  # what a SIGKILL after step 7 leaves: the periodic checkpoints only
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4]
    assert _run(tmp_path) == list(range(5, STEPS + 1))
    assert _differing(straight, _final(tmp_path)) == []


def test_a_resume_with_another_thread_count_is_still_bitwise_identical(
    straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """A gang restarted where each rank sees more CPUs (another node) keeps the checkpoint's thread count."""
    assert _run(tmp_path, "--stop-after", "6") == list(range(1, 7))
    assert _run(tmp_path, threads=2) == list(range(7, STEPS + 1))
    assert _differing(straight, _final(tmp_path)) == []
