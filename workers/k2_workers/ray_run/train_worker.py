"""One rank of a K2Training on Ray Train: the pods' training loop (`k2_workers.train.loop.train`) in a Ray Train
worker. The rank first sets the torchrun env (RANK, LOCAL_RANK, WORLD_SIZE, ...) and joins the process group
(ray_torch.join_group, rank 0's store on its node's address only), so the loop runs unchanged. After every step
rank 0 sends the record to the driver's channel and reads the stop request there (a stop ends the run after the next
step with a checkpoint, as SIGTERM does in a pod); at each checkpoint every rank reports the record and the
checkpoint to Ray Train."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from k2_workers.ray_run.channel import ChannelClient
from k2_workers.ray_run.ray_torch import join_group
from k2_workers.train.config import RunConfig
from k2_workers.train.signals import StopFlag

RUN = "run"  # train_loop_config keys
CHANNEL = "channel"
RUN_DIR = "run_dir"


def ray_checkpoint(path: str | None, run_dir: Path) -> Checkpoint | None:
    """The step's checkpoint as Ray Train registers it without copying: only one inside the run's directory."""
    if path is None or not Path(path).resolve().is_relative_to(run_dir.resolve()):
        return None
    return Checkpoint(path)


def train_rank(config: Mapping[str, Any]) -> None:
    """Ray Train's per-worker function."""
    from k2_workers.train.loop import train  # torch and the model: in the workers only

    logging.basicConfig(level=logging.INFO, format=f"rank{os.environ.get('RANK', '0')} %(levelname)s %(message)s")
    cfg: RunConfig = config[RUN]
    channel: ChannelClient = config[CHANNEL]
    run_dir = Path(config[RUN_DIR])
    is_main = ray.train.get_context().get_world_rank() == 0
    stop = StopFlag()
    if is_main:
        channel.started()

    def on_step(record: Mapping[str, Any], checkpoint: str | None) -> None:
        if is_main:
            channel.put(record)
            if channel.stop_requested():
                stop.set()  # the loop all-reduces the flag: every rank stops after the same (next) step
        if checkpoint is not None:
            # A barrier that waits for Ray Train's controller to take the previous report (it polls every few
            # seconds): made at checkpoints only, the steps in between are not held up.
            ray.train.report(
                dict(record),
                checkpoint=ray_checkpoint(checkpoint, run_dir),
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )

    server = join_group("nccl" if cfg.device == "cuda" else "gloo", cfg.process_group_timeout_s)
    try:
        with open(os.devnull, "w") as sink:  # rank 0's step lines go to the driver through the channel instead
            code = train(cfg, out=sink, stop=stop, on_step=on_step)
    finally:
        if server is not None:
            server.close()
    if is_main:
        channel.finish(code)
