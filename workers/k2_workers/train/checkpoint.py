"""Atomic, sharded checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is the directory `step-N/` under the checkpoint root. All ranks write it with DCP into `step-N.tmp/`;
after a barrier rank 0 writes the marker `COMPLETE` (last) and renames the directory to `step-N/`. Only directories
named `step-N` that hold the marker count, so a half-written checkpoint is never resumed. Rank 0 keeps the newest
`keep_last` checkpoints and deletes older ones and stale `.tmp` directories.

Contents (one DCP state dict): `model.*` (the model's state dict, router biases included), `optim.*` (the optimizer's
tensors, flattened generically so any optimizer's `state_dict()` round-trips), `optim_skeleton` (the optimizer state
dict's structure with tensors replaced by their keys), and `extra.rank{r}` for every rank (the scheduler, the data
position, the RNG states and the step: small Python objects).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
_TENSOR_REF = "__tensor__:"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under root, oldest first."""
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


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list/tuple by a reference string; return (skeleton, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return _TENSOR_REF + path
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k!r}") for k, v in node.items()}
        if isinstance(node, list | tuple):
            items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return walk(obj, prefix), tensors


def tensor_refs(skeleton: Any) -> list[str]:
    """The tensor keys a skeleton of `split_tensors` refers to."""
    if isinstance(skeleton, str) and skeleton.startswith(_TENSOR_REF):
        return [skeleton.removeprefix(_TENSOR_REF)]
    if isinstance(skeleton, dict):
        return [ref for v in skeleton.values() for ref in tensor_refs(v)]
    if isinstance(skeleton, list | tuple):
        return [ref for v in skeleton for ref in tensor_refs(v)]
    return []


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(skeleton, str) and skeleton.startswith(_TENSOR_REF):
        return tensors[skeleton.removeprefix(_TENSOR_REF)]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        items = [join_tensors(v, tensors) for v in skeleton]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


@dataclass
class TrainState:
    """What a checkpoint restores besides model weights and optimizer state."""

    step: int
    extra: dict[str, Any]  # scheduler, data position, RNG states, ...


class CheckpointManager:
    """Saves and restores (model, optimizer, per-rank extras) atomically under `root`."""

    def __init__(self, root: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("checkpoint keepLast must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last

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
        between ranks (expert shards): they and their optimizer state are stored under `name@shard_tag`, so that
        ranks holding the same shard write it once and ranks holding different shards do not collide.
        `before_rename` is a test hook."""
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        rank = _rank()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        skeleton, optim_tensors = split_tensors(optimizer.state_dict())
        tag = _Tagger(model, optimizer, shard_tag, sharded)
        state: dict[str, Any] = {
            "model": tag.model_keys(model.state_dict()),
            "optim": tag.optim_keys(optim_tensors),
            "optim_skeleton": pickle.dumps(skeleton),
            f"extra.rank{rank}": pickle.dumps({"step": step, **extra}),
        }
        with _single_process_quiet():
            dcp_save(state, checkpoint_id=str(tmp), no_dist=not _is_dist())
        _barrier()
        if rank == 0:
            if before_rename is not None:
                before_rename(tmp)
            marker = {"step": step, "world_size": dist.get_world_size() if _is_dist() else 1, "time": time.time()}
            _write_durably(tmp / COMPLETE_MARKER, json.dumps(marker) + "\n")
            if final.exists():  # a complete checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(step)
        _barrier()
        log.info("checkpoint written: %s", final)
        return final

    def _prune(self, current_step: int) -> None:
        for step, path in complete_checkpoints(self.root)[: -self.keep_last]:
            log.info("deleting old checkpoint step %d", step)
            shutil.rmtree(path, ignore_errors=True)
        for child in self.root.iterdir():
            match = _TMP_DIR.match(child.name)
            if match and int(match.group(1)) <= current_step:
                shutil.rmtree(child, ignore_errors=True)

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        shard_tag: str | None = None,
        sharded: Collection[str] = (),
    ) -> TrainState:
        """Collective. Restores model and optimizer in place and returns this rank's extras (rank 0's when this
        rank did not exist in the saved run, i.e. the world grew)."""
        reader = FileSystemReader(str(path))
        metadata = reader.read_metadata()
        keys = metadata.state_dict_metadata
        rank = _rank()
        extra_key = f"extra.rank{rank}" if f"extra.rank{rank}" in keys else "extra.rank0"
        small: dict[str, Any] = {"optim_skeleton": b"", extra_key: b""}
        with _single_process_quiet():
            dcp_load(small, checkpoint_id=str(path), no_dist=not _is_dist())

        tag = _Tagger(model, optimizer, shard_tag, sharded)
        skeleton = pickle.loads(small["optim_skeleton"])
        wanted = dict.fromkeys(tensor_refs(skeleton))  # the (untagged) tensor paths of the optimizer state
        optim_template: dict[str, torch.Tensor] = {}
        for key in tag.optim_keys(wanted):
            meta = keys.get(f"optim.{key}")
            if not isinstance(meta, TensorStorageMetadata):
                raise ValueError(f"checkpoint {path}: no optimizer tensor {key!r} (saved with another parallelism?)")
            optim_template[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        state: dict[str, Any] = {"model": tag.model_keys(model.state_dict()), "optim": optim_template}
        with _single_process_quiet():
            dcp_load(state, checkpoint_id=str(path), no_dist=not _is_dist())
        model.load_state_dict(tag.untag(state["model"]))
        optimizer.load_state_dict(join_tensors(skeleton, tag.untag(state["optim"])))
        extra = pickle.loads(small[extra_key])
        return TrainState(step=int(extra.pop("step")), extra=extra)


class _Tagger:
    """Renames the state of sharded parameters to `key@tag` (model keys and the optimizer's per-parameter state)."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tag: str | None, sharded: Collection[str]
    ) -> None:
        self.tag = tag
        self.model_sharded = set(sharded) if tag else set()
        sharded_ids = {id(p) for name, p in model.named_parameters() if name in self.model_sharded}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Optimizer.state_dict numbers parameters in param_groups order; split_tensors paths start with the number
        self.optim_prefixes = tuple(f"/'state'/{i}/" for i, p in enumerate(params) if id(p) in sharded_ids)

    def model_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        return {(f"{k}@{self.tag}" if k in self.model_sharded else k): v for k, v in state.items()}

    def optim_keys(self, tensors: dict[str, Any]) -> dict[str, Any]:
        if not self.optim_prefixes:
            return dict(tensors)
        return {(f"{k}@{self.tag}" if k.startswith(self.optim_prefixes) else k): v for k, v in tensors.items()}

    def untag(self, state: dict[str, Any]) -> dict[str, Any]:
        suffix = f"@{self.tag}"
        return {k.removesuffix(suffix) if self.tag else k: v for k, v in state.items()}


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
