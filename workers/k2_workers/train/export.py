"""The trained model, in Hugging Face format, for serving: written once a run reaches `steps`, recorded in status.

Rank 0 writes `k2_workers.model.save_pretrained`'s layout (config.json, `model-0000i-of-0000n.safetensors` with the
DeepSeek-V3 / Kimi-K2 tensor names, `model.safetensors.index.json`) plus the tokenizer files of the checkpoint the run
started from, into `<dir>.tmp` beside the target, then swaps it in by renames, so a reader never sees half an export.
A rerun (a gang restarted after the export crashed, which resumes at the last step) writes it again.

In a cluster rank 0 then merge-patches `status.export` (uri, step, dtype, writtenAt) of its K2Training, before the
pod exits: the operator marks the training Succeeded only after every pod exited 0, so a Succeeded training's status
names its export. A K2Serving serves it with `spec.model.checkpointUri` set to that uri.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from k2_api.common import DType
from k2_api.contract import Env
from k2_workers.incluster import SERVICE_ACCOUNT_DIR, InClusterClient
from k2_workers.model import K2ForCausalLM, save_pretrained
from k2_workers.model.checkpoint import DEFAULT_MAX_SHARD_BYTES
from k2_workers.model.experts import RoutedExperts
from k2_workers.parallel import ExpertParallelExperts
from k2_workers.tokenizer import TIKTOKEN_FILE
from k2_workers.train.config import RunConfig
from k2_workers.train.parallel import ParallelPlan
from k2_workers.train.status import status_path

log = logging.getLogger(__name__)

TOKENIZER_FILES = (TIKTOKEN_FILE, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Copied from the checkpoint a run started from (serving reads the tokenizer and chat template there)."""
TORCH_DTYPES = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16}
REPORT_ATTEMPTS = 5


def export_finished_run(model: K2ForCausalLM, plan: ParallelPlan, cfg: RunConfig, step: int, is_main: bool) -> None:
    """Collective (with expert parallelism): the export of a run that reached `cfg.steps`, written and reported by
    rank 0; nothing when the run has no export directory."""
    if cfg.export_dir is None:
        if is_main:
            log.info("no export: neither spec.checkpointing.uri nor claimName, nor --export-dir")
        return
    gather_experts_(model, plan)
    if not is_main:
        return
    path = write_export(model, cfg.export_dir, cfg.export_dtype, cfg.model_checkpoint)
    uri = cfg.export_uri or f"file://{path.resolve()}"
    reported = report_export(export_record(uri, step, cfg.export_dtype))
    log.info("exported step %d to %s%s", step, uri, " (status.export written)" if reported else "")


def gather_experts_(model: K2ForCausalLM, plan: ParallelPlan) -> None:
    """Collective over each expert-parallel group: every MoE layer's shards become one `RoutedExperts` holding all
    experts, on every rank of the group (the run is over: the model is not trained further)."""
    if plan.expert_parallel == 1:
        return
    for moe in model.moe_blocks():
        shard = moe.experts
        assert isinstance(shard, ExpertParallelExperts)
        ids: list[list[int] | None] = [None] * plan.expert_parallel
        dist.all_gather_object(ids, shard.expert_ids, group=plan.ep_group)
        every = [expert for rank_ids in ids if rank_ids is not None for expert in rank_ids]
        _, intermediate, hidden = shard.gate_proj.shape
        full = RoutedExperts(shard.num_experts, hidden, intermediate, expert_ids=every)
        for name in ("gate_proj", "up_proj", "down_proj"):
            local = getattr(shard, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(plan.expert_parallel)]
            dist.all_gather(parts, local, group=plan.ep_group)
            getattr(full, name).data = torch.cat(parts)
        moe.experts = full


def write_export(
    model: K2ForCausalLM,
    directory: str | Path,
    dtype: DType | str = DType.FP32,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Writes the export of `model` (all experts held, as with expertParallel 1) to `directory`; returns it."""
    stored = DType(dtype)
    if stored not in TORCH_DTYPES:
        raise ValueError(f"dtype: an export stores fp32 or bf16 (an fp8 run exports bf16), got {stored.value}")
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():  # what an interrupted export left
        shutil.rmtree(tmp)
    save_pretrained(model, tmp, dtype=TORCH_DTYPES[stored], max_shard_bytes=max_shard_bytes)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, tmp / name)
    _swap_in(tmp, final)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """`tmp` becomes `final`; an older `final` is renamed aside first, then deleted."""
    old = final.with_name(f".deleting-{final.name}-{time.time_ns()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_record(uri: str, step: int, dtype: DType | str, now: datetime.datetime | None = None) -> dict[str, Any]:
    """The `status.export` object (camelCase, as in the K2Training API)."""
    written = now or datetime.datetime.now(datetime.UTC)
    return {"uri": uri, "step": step, "dtype": DType(dtype).value, "writtenAt": written.strftime("%Y-%m-%dT%H:%M:%SZ")}


def report_export(
    record: dict[str, Any],
    env: Mapping[str, str] = os.environ,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    retry_s: float = 1.0,
) -> bool:
    """Merge-patches `status.export` of this pod's K2Training; False outside a cluster. Retries a few times, then
    raises: a Succeeded training must name its export, so the pod fails and the restarted gang exports again."""
    client = InClusterClient.from_env(env, service_account_dir)
    name = env.get(Env.TRAINING_NAME)
    if client is None or not name:
        return False
    path = status_path(client.namespace, name)
    for attempt in range(1, REPORT_ATTEMPTS + 1):
        try:
            client.merge_patch(path, {"status": {"export": record}})
            return True
        except OSError as error:  # urllib's HTTPError and URLError are OSErrors
            if attempt == REPORT_ATTEMPTS:
                raise
            log.warning("status.export update failed (attempt %d): %s", attempt, error)
            time.sleep(retry_s * attempt)
    raise AssertionError("unreachable")
