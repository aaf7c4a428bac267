"""`k2 run` of a K2Training on a real local Ray instance (2 CPUs): it learns, a Ctrl-C checkpoints and stops, the
same command resumes, and a Ray Train worker killed mid-run restarts the gang from the newest complete checkpoint;
the run ends with the model and optimizer tensors of an uninterrupted run, bit for bit (as tests/train's exact
resume under torchrun)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import ray.train  # noqa: F401  the test extra installs ray: a missing install fails here, never skips
import torch
from safetensors.torch import load_file

from k2_api.contract import ExitCodes
from k2_workers.train.checkpoint import complete_checkpoints
from k2_workers.train.checkpoint_files import TENSORS_FILE
from tests.support.listeners import LOOPBACK_HEX, listening_addresses

from .run import k2_run, kill_one_train_worker, manifest

pytestmark = pytest.mark.distributed

# The worker is killed two steps after the resumed run starts, once the listeners are read from /proc: with 12
# steps (0.1 s each) the run could finish first, and then no gang restarted (seen once here, 2026-12-01).
STEPS = 40
NAME = "k2-debug-train"  # metadata.name of the example


def _final(storage: Path) -> dict[str, torch.Tensor]:
    return load_file(storage / NAME / "checkpoints" / f"step-{STEPS}" / TENSORS_FILE)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return manifest(tmp_path_factory.mktemp("manifest"), steps=STEPS, every=8)


@pytest.fixture(scope="module")
def straight(spec_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """An uninterrupted run: every step once, in order, and the loss falls."""
    storage = tmp_path_factory.mktemp("straight") / "runs"
    run = k2_run(spec_file, storage)
    assert run.returncode == ExitCodes.SUCCEEDED, run.stderr[-4000:]
    assert run.steps == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in run.records]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 and r["max_attn_logit"] > 0 for r in run.records)
    return _final(storage)


def test_ctrl_c_checkpoints_a_rerun_resumes_and_a_killed_worker_restarts_the_gang_exactly(
    spec_file: Path, straight: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    storage = tmp_path / "runs"
    stopped = k2_run(spec_file, storage, at_step=3, action=lambda proc: proc.send_signal(signal.SIGINT))
    assert stopped.returncode == ExitCodes.PREEMPTED, stopped.stderr[-4000:]
    last = stopped.steps[-1]
    assert stopped.steps == list(range(1, last + 1)) and 3 < last < STEPS
    assert [s for s, _ in complete_checkpoints(storage / NAME / "checkpoints")][-1] == last

    listeners: set[str] = set()

    def check_listeners_then_kill(proc: subprocess.Popen[str]) -> None:
        listeners.update(listening_addresses(proc.pid))
        kill_one_train_worker(proc)

    resumed = k2_run(spec_file, storage, at_step=last + 2, action=check_listeners_then_kill)
    assert listeners and listeners <= LOOPBACK_HEX, listeners  # Ray, the workers, the group's store: loopback only
    assert resumed.returncode == ExitCodes.SUCCEEDED, resumed.stderr[-4000:]
    assert resumed.steps[0] == last + 1 and resumed.steps[-1] == STEPS
    assert "gang restarted (start 2)" in resumed.stderr  # the killed worker's gang started again

    final = _final(storage)
    assert final.keys() == straight.keys() and any(k.startswith("optim.") for k in final)
    assert [k for k in final if not torch.equal(final[k], straight[k])] == []
