"""The training loop: data parallel K2 training with MuonClip, the WSD schedule and loss-free router balancing.

Data parallel over all ranks, optionally with expert parallelism inside (train/parallel.py).
One step on every rank: forward (bf16 autocast on GPU) and backward on its own batch, gradients averaged over ranks,
global gradient-norm clipping, the learning rate of the WSD schedule, a MuonClip step whose QK-Clip sees the per-head
max attention logits max-reduced over ranks, then the loss-free router-bias update from the expert token counts
summed over ranks (every rank applies the same update to the same bias, so the biases stay identical). Rank 0 prints
one JSON line per step on stdout (a progress bar on a terminal: train/progress.py); logs go to stderr. A run that
reaches `steps` writes its Hugging Face-format export (train/export.py).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F

from k2_api.contract import ExitCodes
from k2_workers.model import K2Config, K2ForCausalLM, load_pretrained, update_router_biases
from k2_workers.optim import MuonClip
from k2_workers.tokenizer import Tokenizer, load_tokenizer
from k2_workers.train.checkpoint import NOT_SHARED_REASON, CheckpointManager
from k2_workers.train.config import RunConfig
from k2_workers.train.data import DataLoader, SampleOrder, load_dataset
from k2_workers.train.distributed import (
    DistEnv,
    all_reduce_,
    broadcast_module_,
    check_replicas_identical,
    init_distributed,
    shutdown,
)
from k2_workers.train.export import export_finished_run
from k2_workers.train.metrics import TrainMetrics
from k2_workers.train.parallel import clip_gradients_, expert_parameter_names, make_plan, shard_experts, sync_gradients_
from k2_workers.train.progress import step_output
from k2_workers.train.schedule import WSDSchedule, wsd_for_run
from k2_workers.train.signals import StopFlag
from k2_workers.train.status import StatusReporter, progress_record, reporter_from_env
from k2_workers.train.termination import preempted_message, write_termination_message

log = logging.getLogger(__name__)

# Called on every rank after each step with the step's record and the checkpoint written at that step (or None): how
# a runner that owns the ranks (k2_workers.ray_run) reports progress.
StepHook = Callable[[Mapping[str, Any], str | None], None]


def build_schedule(cfg: RunConfig) -> WSDSchedule:
    return wsd_for_run(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.decay_steps, cfg.final_lr_ratio)


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> K2ForCausalLM:
    """The same initial weights on every rank: seeded init (rank 0's weights are broadcast afterwards as well)."""
    torch.manual_seed(cfg.seed)
    if cfg.model_checkpoint is not None:
        model = load_pretrained(cfg.model_checkpoint)
    elif cfg.model_hf_config is not None:
        model = K2ForCausalLM(K2Config.from_hf_config(cfg.model_hf_config))
    else:
        assert cfg.model_preset is not None
        model = K2ForCausalLM(K2Config.from_preset(cfg.model_preset))
    vocab_size = model.config.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"model: vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return model


def rng_state() -> dict[str, Any]:
    """The RNG states as JSON values (checkpoint extras are JSON)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def adopt_thread_count(saved: int | None) -> None:
    """Use the checkpoint's intra-op thread count: CPU kernels split their reductions by thread, so a gang restarted
    where its ranks see another number of CPUs would otherwise round differently and not resume bit for bit."""
    if saved is not None and saved != torch.get_num_threads():
        log.warning(
            "using the checkpoint's %d intra-op threads instead of %d (exact resume)", saved, torch.get_num_threads()
        )
        torch.set_num_threads(saved)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class Trainer:
    def __init__(
        self, cfg: RunConfig, env: DistEnv, stop: StopFlag, out: TextIO, on_step: StepHook | None = None
    ) -> None:
        self.cfg, self.env, self.stop, self.out, self.on_step = cfg, env, stop, out, on_step
        self.tokenizer = load_tokenizer(cfg.model_checkpoint)
        self.model = build_model(cfg, self.tokenizer).to(env.device)
        self.model.train()
        broadcast_module_(self.model)
        self.plan = make_plan(env, cfg.expert_parallel)
        shard_experts(self.model, self.plan)
        self.sharded = expert_parameter_names(self.model, self.plan)
        self.optimizer = MuonClip(
            self.model, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, qk_clip_tau=cfg.qk_clip_tau
        )
        self.schedule = build_schedule(cfg)
        self.lr_ratio = {"adamw": cfg.adam_lr / cfg.lr} if cfg.adam_lr is not None and cfg.lr > 0 else {}
        order = SampleOrder(load_dataset(cfg.dataset, self.tokenizer), cfg.seq_len, cfg.seed)
        self.loader = DataLoader(order, cfg.micro_batch_size, env.rank, env.world_size)
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.keep_last) if cfg.checkpoint_dir else None
        self.metrics = TrainMetrics(cfg.name, cfg.metrics_port, steps=cfg.steps) if env.is_main else None
        self.output = step_output(cfg.progress_bar, out, cfg.steps) if env.is_main else None
        self.status: StatusReporter | None = (
            reporter_from_env(min_interval_s=cfg.status_interval_s) if env.is_main else None
        )
        self.step = 0
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = None
        self.checkpoint_fallback: dict[str, Any] | None = None  # Resume.status() of the last resume, for status
        self.checkpoints_disabled_reason: str | None = None  # why this run has no checkpoints, for status

    # --- checkpoints -------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Restores the newest usable checkpoint; first turns checkpoints off when the ranks do not share their
        directory (each would write only its own files: the first save would fail on every attempt)."""
        if self.checkpoints is None:
            return
        if not self.checkpoints.is_shared(self.model, self.optimizer):
            self.checkpoints_disabled_reason = NOT_SHARED_REASON.format(root=self.checkpoints.root)
            log.warning("%s", self.checkpoints_disabled_reason)
            self.checkpoints = None
            return
        resumed = self.checkpoints.restore(self.model, self.optimizer, self.plan.shard_tag)
        self.checkpoint_fallback = resumed.status()
        if resumed.state is None or resumed.path is None:
            log.info("no usable checkpoint under %s: starting from step 0", self.checkpoints.root)
            return
        state = resumed.state
        self.step = state.step
        self.loader.load_state_dict(state.extra["data"])
        set_rng_state(state.extra["rng"])
        adopt_thread_count(state.extra.get("threads"))
        if state.extra["scheduler"]["schedule"] != asdict(self.schedule):
            log.warning("the WSD schedule differs from the checkpoint's; continuing with the new one")
        self.last_checkpoint, self.last_checkpoint_step = str(resumed.path), self.step
        log.info("resumed from %s (step %d)", resumed.path, self.step)

    def save(self) -> None:
        check_replicas_identical(self.model, exclude=self.sharded)
        if self.checkpoints is None:
            return
        extra = {
            "scheduler": {"schedule": asdict(self.schedule), "step": self.step},
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "threads": torch.get_num_threads(),
        }
        path = self.checkpoints.save(
            self.step, self.model, self.optimizer, extra, shard_tag=self.plan.shard_tag, sharded=self.sharded
        )
        self.last_checkpoint, self.last_checkpoint_step = str(path), self.step
        if self.metrics is not None:
            self.metrics.observe_checkpoint(self.step)

    # --- one step ----------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[dict[str, Any], bool]:
        """One optimizer step; returns its record and whether any rank asked to stop."""
        cfg, device = self.cfg, self.env.device
        started = time.perf_counter()
        self.step += 1
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self.lr_ratio.get(group.get("name", ""), 1.0)

        batch = torch.from_numpy(self.loader.next_batch()).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = self.model(inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux = self.model.aux_loss() if cfg.aux_loss_alpha > 0 else None
        torch.autograd.backward(loss if aux is None else loss + cfg.aux_loss_alpha * aux)

        sync_gradients_(self.model, self.plan)
        grad_norm = clip_gradients_(self.model, self.plan, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        max_logits_LH = all_reduce_(self.model.max_attention_logits().detach().float().clone(), dist.ReduceOp.MAX)
        self.optimizer.step(max_attention_logits=max_logits_LH)
        self.optimizer.zero_grad(set_to_none=True)

        counts_LE = all_reduce_(self.model.expert_token_counts().detach().float().clone())
        update_router_biases(self.model, counts_LE, cfg.router_bias_update_rate)

        # one collective for the logged loss and the stop decision, so all ranks stop after the same step
        flags = torch.tensor([loss.item(), float(self.stop.requested)], dtype=torch.float64, device=device)
        shared = all_reduce_(flags)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        num_tokens = inputs.numel() * self.env.world_size
        record = {
            "step": self.step,
            "loss": shared[0].item() / self.env.world_size,
            "lr": lr,
            "tokens_per_s": num_tokens / elapsed,
            "max_attn_logit": max_logits_LH.max().item() if max_logits_LH.numel() else 0.0,
            "clipped_heads": self.optimizer.last_clipped_heads,
            "grad_norm": grad_norm.item(),
            "step_s": elapsed,
        }
        if aux is not None:
            record["aux_loss"] = aux.item()
        if self.model.config.capacity_factor is not None:  # Switch-style capacity: this rank's dropped share
            record["dropped_token_rate"] = self.model.dropped_token_rate()
        if self.metrics is not None:
            self.metrics.observe_step(record, num_tokens, counts_LE.tolist())
        return record, shared[1].item() > 0

    def run(self) -> int:
        self.resume()
        last = self.cfg.steps if self.cfg.stop_after is None else min(self.cfg.steps, self.cfg.stop_after)
        while self.step < last:
            record, stop = self.train_step()
            if self.output is not None:
                self.output.step(record)
            every = self.cfg.checkpoint_every
            if stop or self.step == last or (every and self.step % every == 0):
                self.save()
            if self.status is not None:
                progress = progress_record(
                    self.step,
                    record["loss"],
                    record["tokens_per_s"],
                    record["max_attn_logit"],
                    self.last_checkpoint,
                    self.last_checkpoint_step,
                    checkpoint_fallback=self.checkpoint_fallback,
                    dropped_token_rate=record.get("dropped_token_rate"),
                )
                self.status.report(progress, force=self.last_checkpoint_step == self.step)
            if self.on_step is not None:
                self.on_step(record, self.last_checkpoint if self.last_checkpoint_step == self.step else None)
            if stop and self.step < last:
                # Preemption is not completion: the pod exits PREEMPTED and the gang restarts from this checkpoint.
                message = preempted_message(self.step, self.last_checkpoint)
                log.warning("%s", message)
                write_termination_message(message)
                return ExitCodes.PREEMPTED
        if self.step == self.cfg.steps:  # also after a restart that resumed at the last step
            export_finished_run(self.model, self.plan, self.cfg, self.step, self.env.is_main)
        return ExitCodes.SUCCEEDED

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
        if self.status is not None:
            self.status.close()
        if self.metrics is not None:
            self.metrics.close()


def train(
    cfg: RunConfig, out: TextIO = sys.stdout, stop: StopFlag | None = None, on_step: StepHook | None = None
) -> int:
    """Runs (or resumes) a training run; returns ExitCodes.SUCCEEDED or, after SIGTERM, PREEMPTED. Failures raise.
    Without `stop`, SIGTERM/SIGINT set a flag of its own; a runner whose ranks are not main threads (Ray Train) passes
    the flag it sets itself."""
    own_stop = stop is None
    stop = StopFlag() if stop is None else stop
    if own_stop:
        stop.install()
    try:
        env = init_distributed(cfg.device, cfg.process_group_timeout_s)
        trainer = Trainer(cfg, env, stop, out, on_step)
        try:
            code = trainer.run()
        finally:
            trainer.close()
        shutdown()  # only after success: tearing down a group whose peer died can block
        return code
    finally:
        if own_stop:
            stop.uninstall()
