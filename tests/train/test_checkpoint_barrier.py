"""Checkpoint collectives wait as long as storage needs, not the training process group's (short) timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from k2_workers.train import checkpoint, checkpoint_codec
from k2_workers.train.checkpoint import CheckpointManager, complete_checkpoints
from tests.support.loopback_group import init_loopback_group
from tests.support.ports import free_port

from .launch import base_env

REPO = Path(__file__).parents[2]
GROUP_TIMEOUT_S = 3  # the training process group's timeout in these runs
SLOW_RANK_DELAY_S = 8  # rank 1 takes this long to prepare its checkpoint (a slow volume)
TIMEOUT_ENV = "K2_CHECKPOINT_TIMEOUT_S"
MIN_THROUGHPUT_ENV = "K2_CHECKPOINT_MIN_MBPS"


def collective_timeout_s(state_bytes: int, env: dict[str, str]) -> float:
    assert (checkpoint.TIMEOUT_ENV, checkpoint.MIN_THROUGHPUT_ENV) == (TIMEOUT_ENV, MIN_THROUGHPUT_ENV)
    return checkpoint.collective_timeout_s(state_bytes, env)


def test_the_timeout_grows_with_the_checkpoint_size_and_can_be_set() -> None:
    small, large = collective_timeout_s(10**6, {}), collective_timeout_s(10**11, {})
    assert small >= 60 and large > small + 1000  # 100 GB at the default minimum throughput takes a while
    assert collective_timeout_s(10**11, {MIN_THROUGHPUT_ENV: "1000"}) < large
    assert collective_timeout_s(10**11, {TIMEOUT_ENV: "42"}) == 42


@pytest.mark.parametrize("env", [{TIMEOUT_ENV: "0"}, {TIMEOUT_ENV: "soon"}, {MIN_THROUGHPUT_ENV: "-1"}])
def test_bad_timeout_settings_are_refused_naming_the_variable(env: dict[str, str]) -> None:
    [name] = env
    with pytest.raises(ValueError, match=name):
        collective_timeout_s(1, env)


def _child(rank: int, port: int, root: Path) -> None:
    init_loopback_group(rank, 2, port, timeout_s=GROUP_TIMEOUT_S)
    if rank == 1:
        split = checkpoint_codec.split_tensors

        def slow_split(obj: Any, prefix: str = "") -> Any:
            time.sleep(SLOW_RANK_DELAY_S)
            return split(obj, prefix)

        checkpoint_codec.split_tensors = slow_split
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    CheckpointManager(root).save(1, model, torch.optim.AdamW(model.parameters()), {"rank": rank})
    dist.destroy_process_group()


def _save_with_a_slow_rank(root: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    port = free_port()
    command = [sys.executable, "-m", "tests.train.test_checkpoint_barrier"]
    procs = [
        subprocess.Popen(
            [*command, str(rank), str(port), str(root)],
            cwd=REPO,
            env=base_env() | env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    return results


@pytest.mark.distributed
def test_a_slow_rank_does_not_time_out_a_checkpoint(tmp_path: Path) -> None:
    ranks = _save_with_a_slow_rank(tmp_path, {TIMEOUT_ENV: "120"})
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]


@pytest.mark.distributed
def test_the_configured_timeout_still_bounds_the_wait(tmp_path: Path) -> None:
    ranks = _save_with_a_slow_rank(tmp_path, {TIMEOUT_ENV: "1"})
    assert ranks[0].returncode != 0 and "timed out" in ranks[0].stderr.lower(), ranks[0].stderr[-3000:]
    assert complete_checkpoints(tmp_path) == []


if __name__ == "__main__":
    os.environ.pop("WORLD_SIZE", None)
    _child(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
