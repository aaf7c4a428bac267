"""The driver of a K2Training on Ray Train: builds the TorchTrainer from the plan, runs it in a thread and prints
rank 0's step records as they come (the worker's own progress bar on a terminal, JSON lines otherwise). The first
SIGINT or SIGTERM asks the ranks to checkpoint and stop (a second one stops the driver at once); running the same
command again resumes from that checkpoint."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import FrameType
from typing import Any, TextIO

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from k2_api.contract import ExitCodes
from k2_workers.ray_run.channel import ChannelClient
from k2_workers.ray_run.ray_torch import RankJoinsConfig
from k2_workers.ray_run.train_plan import TrainPlan
from k2_workers.ray_run.train_worker import CHANNEL, RUN, RUN_DIR, train_rank
from k2_workers.train.config import RunConfig as K2RunConfig
from k2_workers.train.progress import StepOutput, step_output

log = logging.getLogger(__name__)
POLL_S = 0.2


def rank_config(cfg: K2RunConfig, plan: TrainPlan) -> K2RunConfig:
    """What every rank runs: the manifest's config with the plan's device and checkpoint directory."""
    return replace(cfg, device=plan.device, checkpoint_dir=plan.checkpoint_dir, progress_bar=False)


def build_trainer(cfg: K2RunConfig, plan: TrainPlan, channel: ChannelClient) -> TorchTrainer:
    return TorchTrainer(
        train_rank,
        train_loop_config={RUN: rank_config(cfg, plan), CHANNEL: channel, RUN_DIR: str(plan.run_dir)},
        torch_config=RankJoinsConfig(backend=plan.backend, timeout_s=max(1, int(cfg.process_group_timeout_s))),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
            placement_strategy=plan.placement_strategy,
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=plan.max_failures),
        ),
    )


@contextmanager
def stop_on_signals(channel: ChannelClient) -> Iterator[None]:
    """SIGINT/SIGTERM: the first asks the ranks to stop after a checkpoint, the second raises KeyboardInterrupt."""
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: checkpointing and stopping after this step", file=sys.stderr)
        channel.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Printer:
    """Prints rank 0's records as they come, and a line when the gang started again (after a worker died)."""

    def __init__(self, output: StepOutput, err: TextIO) -> None:
        self._output, self._err = output, err
        self._starts = 1

    def show(self, starts: int, records: list[dict[str, Any]]) -> None:
        if starts > self._starts and records:
            self._output.close()
            print(f"gang restarted (start {starts}): resuming at step {records[0]['step']}", file=self._err)
            self._starts = starts
        for record in records:
            self._output.step(record)

    def close(self) -> None:
        self._output.close()


def run_training(
    cfg: K2RunConfig, plan: TrainPlan, *, json_lines: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Runs the gang to the end (or to a requested stop); the worker's exit code (ExitCodes)."""
    channel = ChannelClient.start()
    trainer = build_trainer(cfg, plan, channel)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # reported by the driver thread
            failure.append(error)

    printer = Printer(step_output(not json_lines and out.isatty(), out, cfg.steps), err)
    print(
        f"{plan.name}: {plan.num_workers} Ray Train workers ({plan.backend}), checkpoints in {plan.checkpoint_dir}",
        file=err,
    )
    with stop_on_signals(channel):
        thread = threading.Thread(target=fit, name="k2-ray-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            printer.show(*channel.take())
        printer.show(*channel.take())
    printer.close()
    if failure:
        print(f"training failed: {failure[0]}", file=err)
        return ExitCodes.CRASHED
    code = channel.code()
    return ExitCodes.CRASHED if code is None else code
