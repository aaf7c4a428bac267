"""Atomic, sharded checkpoints in safetensors and JSON: nothing in a checkpoint is pickled, so nothing runs code.

A checkpoint is the directory `step-N/` under the checkpoint root. All ranks write their files into `step-N.tmp/`;
after a barrier rank 0 writes the marker `COMPLETE` (last) and renames the directory to `step-N/`. Only directories
named `step-N` that hold the marker count, so a half-written checkpoint is never resumed. Rank 0 keeps the newest
`keep_last` checkpoints. Deleting is atomic: a directory is first renamed to `.deleting-<name>-<unique>` (which never
counts), then removed, so a crash can leave garbage but never a `step-N` with files missing; a start (`restore`)
removes the garbage of earlier attempts (`.deleting-*` and `step-N.tmp`).

The files of a checkpoint and their checks are train/checkpoint_files.py.

Resuming (`restore`) tries the complete-looking checkpoints newest first. One that any rank cannot read is skipped
(every rank agrees on the verdict), moved aside to `step-N.corrupt-<unix time>` so that it is neither resumed nor
counted for `keep_last` again, and reported: `Resume.skipped` and `Resume.status()`, the record the status reporter
and the operator turn into an Event. A checkpoint that reads fine but does not fit the model raises: that is a
configuration error, and the older checkpoints would not fit either.

The ranks of a gang must share the checkpoint root (a PersistentVolumeClaim or bucket mount): `is_shared` checks it
at start, with a probe file `.shared-probe-<token>` that rank 0 writes and every rank reads back. When they do not
(an emptyDir per pod), the trainer runs without checkpoints rather than failing in its first save.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from k2_workers.train import checkpoint_codec as codec
from k2_workers.train import checkpoint_files as files
from k2_workers.train.checkpoint_files import COMPLETE_MARKER, CheckpointError, TrainState
from k2_workers.train.distributed import checkpoint_group

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
# Checkpoint collectives run on their own gloo group, whose timeout follows the checkpoint's size (collective_timeout_s)
TIMEOUT_ENV = "K2_CHECKPOINT_TIMEOUT_S"
MIN_THROUGHPUT_ENV = "K2_CHECKPOINT_MIN_MBPS"
BASE_TIMEOUT_S = 300.0
DEFAULT_MIN_THROUGHPUT_MBPS = 25.0
PROBE_PREFIX = ".shared-probe-"
NOT_SHARED_REASON = (
    "the checkpoint directory {root} is not shared by the gang's ranks (an emptyDir per pod?): "
    "checkpoints are off for this run; set spec.checkpointing.claimName or uri to keep them"
)
_T = TypeVar("_T")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _world_size() -> int:
    return dist.get_world_size() if _is_dist() else 1


def _barrier(group: dist.ProcessGroup | None) -> None:
    if _is_dist():
        dist.barrier(group=group)


def collective_timeout_s(state_bytes: int, env: Mapping[str, str] = os.environ) -> float:
    """How long a rank waits for the others in a checkpoint's collectives: `K2_CHECKPOINT_TIMEOUT_S` when set, else
    `BASE_TIMEOUT_S` plus the time to write `state_bytes` and read them back (hashing) at the slowest storage
    throughput assumed, `K2_CHECKPOINT_MIN_MBPS` (MB/s). ValueError naming the variable when a setting is bad."""
    fixed = _positive(env, TIMEOUT_ENV)
    if fixed is not None:
        return fixed
    throughput = _positive(env, MIN_THROUGHPUT_ENV) or DEFAULT_MIN_THROUGHPUT_MBPS
    return BASE_TIMEOUT_S + 2 * state_bytes / (throughput * 1e6)


def _positive(env: Mapping[str, str], name: str) -> float | None:
    if not env.get(name):
        return None
    try:
        value = float(env[name])
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {env[name]!r}")
    return value


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's model and optimizer state, what its checkpoint holds; before the first step (on resume)
    the optimizer's state is estimated as two float32 tensors per parameter (Adam's moments)."""
    model_bytes: int = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if tensors:
        optim_bytes: int = sum(t.numel() * t.element_size() for t in tensors)
    else:
        optim_bytes = 8 * sum(p.numel() for p in model.parameters())
    return model_bytes + optim_bytes


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint under root (named `step-N`, with the marker), oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint that looked complete but could not be read, and why (one line per rank that failed)."""

    step: int
    path: str
    reason: str


MAX_REASON = 4096  # the API's bounds on a skipped checkpoint's path and reason, and on how many are listed
MAX_SKIPPED = 100


@dataclass(frozen=True)
class Resume:
    """The outcome of `CheckpointManager.restore`."""

    path: Path | None  # the checkpoint resumed from; None: start from step 0
    state: TrainState | None
    skipped: tuple[SkippedCheckpoint, ...] = ()  # newer checkpoints that could not be read, newest first

    def status(self) -> dict[str, Any] | None:
        """None when nothing was skipped; else `status.progress.checkpointFallback` of the K2Training API (camelCase;
        the operator turns it into the CheckpointFallback condition and its Warning event)."""
        if not self.skipped:
            return None
        return {
            "resumedFrom": str(self.path) if self.path is not None else None,
            "resumedStep": self.state.step if self.state is not None else None,
            "skipped": [
                {"step": s.step, "path": s.path[:MAX_REASON], "reason": s.reason[:MAX_REASON]}
                for s in self.skipped[:MAX_SKIPPED]
            ],
        }

    def message(self) -> str:
        """One line for logs and Events."""
        skipped = "; ".join(f"{s.path} ({s.reason})" for s in self.skipped)
        target = f"step {self.state.step} ({self.path})" if self.state is not None else "step 0: none was usable"
        return f"checkpoint fallback: skipped {skipped}; resuming from {target}"


class CheckpointManager:
    """Saves and restores (model, optimizer, per-rank extras) atomically under `root`."""

    def __init__(self, root: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("checkpoint keepLast must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last
        self._group: dist.ProcessGroup | None = None
        self._group_made = False

    def _collectives(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dist.ProcessGroup | None:
        """Collective on first use: the group for this manager's waits, with a timeout sized for its state."""
        if not self._group_made:
            timeout_s = collective_timeout_s(state_bytes(model, optimizer))
            self._group, self._group_made = checkpoint_group(timeout_s), True
            if _rank() == 0 and _is_dist():
                log.info("checkpoint collectives wait up to %.0f s", timeout_s)
        return self._group

    def is_shared(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Collective: whether every rank sees the same directory at `root`. Rank 0 writes a probe file named after a
        random token and holding it, every rank reads it back, and all agree (False if any rank misses it); the probe
        is removed. Always True in a single-process world. Call it before the first `restore` or `save`."""
        if _world_size() == 1:
            return True
        rank = _rank()
        group = self._collectives(model, optimizer)
        token = _broadcast(uuid.uuid4().hex if rank == 0 else None, group)
        probe = self.root / f"{PROBE_PREFIX}{token}"  # a name no rank looked up before: no stale (NFS) lookup cache
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            files.write_durably(probe, token)
            files.fsync_dir(self.root)
        _barrier(group)
        try:
            sees = probe.read_text() == token
        except OSError:
            sees = False
        shared = _all_true(sees, group)  # every rank has read the probe once this returns
        if rank == 0:
            probe.unlink(missing_ok=True)
        return shared

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        before_rename: Callable[[Path], None] | None = None,
        shard_tag: str | None = None,
        sharded: Collection[str] = (),
    ) -> Path:
        """Collective: every rank calls it. Returns the final directory. `sharded` names the parameters that differ
        between ranks (expert shards): they and their optimizer state go to the file of `shard_tag`, written once by
        the lowest rank holding that tag. `extra` must be JSON values (TypeError otherwise, before anything is
        written). `before_rename` is a test hook."""
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        rank = _rank()
        group = self._collectives(model, optimizer)
        extra_json = codec.dumps({"step": step, **extra}, "checkpoint extra")
        skeleton, optim_tensors = codec.split_tensors(optimizer.state_dict())
        skeleton_json = codec.dumps(skeleton, "optimizer state")
        split = _ShardSplit(model, optimizer, shard_tag, sharded)
        replicated, shards = split({"model": model.state_dict(), "optim": optim_tensors})
        writes_shards = shard_tag is not None and _lowest_rank_with(shard_tag, group) == rank
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                files.delete_dir(tmp)
            tmp.mkdir(parents=True)
        _barrier(group)
        contents: dict[str, files.FileContent] = {files.extra_file(rank): extra_json}
        if rank == 0:
            contents[files.TENSORS_FILE] = replicated
            contents[files.OPTIMIZER_FILE] = skeleton_json
        if writes_shards:
            contents[files.shard_file(shard_tag)] = shards
        files.write_rank_files(tmp, rank, contents)
        _barrier(group)
        if rank == 0:
            if before_rename is not None:
                before_rename(tmp)
            files.write_marker(tmp, step, _world_size())
            previous = files.move_aside(final) if final.exists() else None  # the same step from an earlier attempt
            os.replace(tmp, final)
            files.fsync_dir(self.root)
            if previous is not None:
                shutil.rmtree(previous, ignore_errors=True)
            self._prune(step)
        _barrier(group)
        log.info("checkpoint written: %s", final)
        return final

    def _prune(self, current_step: int) -> None:
        for step, path in complete_checkpoints(self.root)[: -self.keep_last]:
            log.info("deleting old checkpoint step %d", step)
            files.delete_dir(path)
        for child in self.root.iterdir():
            match = _TMP_DIR.match(child.name)
            if match and int(match.group(1)) <= current_step:
                files.delete_dir(child)

    def clean(self) -> list[str]:
        """Removes what interrupted saves, deletions and probes left (`.deleting-*`, `step-N.tmp`, `.shared-probe-*`);
        returns their names.
        Only when no rank is saving: `restore` calls it on rank 0 before any checkpoint is written."""
        if not self.root.is_dir():
            return []
        removed = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(files.DELETING_PREFIX):
                shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(PROBE_PREFIX):  # a crash during `is_shared`
                child.unlink(missing_ok=True)
            elif _TMP_DIR.match(child.name):
                files.delete_dir(child)
            else:
                continue
            removed.append(child.name)
        if removed:
            log.info("removed leftovers of an interrupted run under %s: %s", self.root, ", ".join(removed))
        return removed

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, shard_tag: str | None = None) -> Resume:
        """Collective. Restores the newest checkpoint that every rank can read, skipping (and moving aside) the
        unreadable ones; a Resume without a path when there is none."""
        rank = _rank()
        group = self._collectives(model, optimizer)
        if rank == 0:
            self.clean()
        candidates = _broadcast(
            [(s, str(p)) for s, p in reversed(complete_checkpoints(self.root))] if rank == 0 else None, group
        )
        skipped: list[SkippedCheckpoint] = []
        for step, name in candidates:
            path = Path(name)
            try:
                loaded, error = files.read_checkpoint(path, rank, shard_tag), None
            except CheckpointError as failure:
                loaded, error = None, str(failure)
            errors = _gather_errors(error, group)
            if loaded is None or any(errors):
                reason = "; ".join(e if len(errors) == 1 else f"rank {r}: {e}" for r, e in enumerate(errors) if e)
                skipped.append(SkippedCheckpoint(step, name, reason))
                if rank == 0:
                    self._set_aside(path)
                continue
            files.apply_checkpoint(loaded, model, optimizer)
            resume = Resume(path, loaded.state, tuple(skipped))
            break
        else:
            resume = Resume(None, None, tuple(skipped))
        if skipped and rank == 0:
            log.warning("%s", resume.message())
        return resume

    def _set_aside(self, path: Path) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        files.fsync_dir(self.root)
        log.warning("moved the unusable checkpoint %s to %s", path, aside.name)

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        shard_tag: str | None = None,
    ) -> TrainState:
        """Collective. Restores model and optimizer in place and returns this rank's extras (rank 0's when this
        rank did not exist in the saved run, i.e. the world grew). CheckpointError when a file this rank reads is
        missing, altered or unreadable (the model is then unchanged); ValueError when the checkpoint is intact but
        does not fit the model (another configuration or parallelism)."""
        loaded = files.read_checkpoint(path, _rank(), shard_tag)
        files.apply_checkpoint(loaded, model, optimizer)
        return loaded.state


class _ShardSplit:
    """Which state belongs to sharded parameters: the model's `sharded` names and their optimizer state."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tag: str | None, sharded: Collection[str]
    ) -> None:
        self.model_sharded = set(sharded) if tag else set()
        sharded_ids = {id(p) for name, p in model.named_parameters() if name in self.model_sharded}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Optimizer.state_dict numbers parameters in param_groups order; split_tensors paths start with the number
        self.optim_prefixes = tuple(f"/'state'/{i}/" for i, p in enumerate(params) if id(p) in sharded_ids)

    def __call__(
        self, state: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({"model.k" | "optim.k": tensor} of replicated state, the same of sharded state)."""
        replicated: dict[str, torch.Tensor] = {}
        shards: dict[str, torch.Tensor] = {}
        for kind, tensors in state.items():
            for key, tensor in tensors.items():
                if kind == "model":
                    is_shard = key in self.model_sharded
                else:
                    is_shard = bool(self.optim_prefixes) and key.startswith(self.optim_prefixes)
                (shards if is_shard else replicated)[f"{kind}.{key}"] = tensor
        return replicated, shards


def _broadcast(value: _T | None, group: dist.ProcessGroup | None) -> _T:
    """Collective: rank 0's value (e.g. the checkpoints to try, so every rank tries the same ones in the same order)."""
    if not _is_dist():
        assert value is not None
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)  # between the gang's ranks, never read from the volume
    assert box[0] is not None
    return box[0]


def _all_true(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Collective: whether `flag` holds on every rank."""
    if not _is_dist():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)  # the checkpoint group is gloo: a CPU tensor
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def _gather_errors(error: str | None, group: dist.ProcessGroup | None) -> list[str | None]:
    """Collective: every rank's error reading a checkpoint (None where it read fine)."""
    if not _is_dist():
        return [error]
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)
    return errors


def _lowest_rank_with(tag: str, group: dist.ProcessGroup | None) -> int:
    """Collective: the lowest rank whose shard tag is `tag` (ranks with the same tag hold identical shards)."""
    if not _is_dist():
        return 0
    tags: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(tags, tag, group=group)  # in-memory between the gang's ranks, never read from the volume
    return tags.index(tag)
