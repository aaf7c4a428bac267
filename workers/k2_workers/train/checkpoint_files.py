"""The on-disk format of a training checkpoint: safetensors and JSON files plus a `COMPLETE` marker that lists them.

Pure file I/O for one rank; the collective protocol around it (who writes what, when the marker is written, which
checkpoint is resumed) is train/checkpoint.py. Files of a checkpoint directory:
- `tensors.safetensors` (rank 0): the model's state dict (`model.<name>`, router biases included) and the optimizer's
  tensors (`optim.<path>`), except expert shards;
- `tensors.<tag>.safetensors` (the lowest rank of each shard tag): the expert shards and their optimizer state;
- `optimizer.json` (rank 0): the optimizer state dict's structure, tensors replaced by their keys (checkpoint_codec);
- `extra.rank<r>.json` (every rank): the step and the extras (scheduler, data position, RNG states): JSON values;
- `files.rank<r>.json` (every rank): size and SHA-256 of the files that rank wrote;
- `COMPLETE` (rank 0, last): JSON with the format, the step, the world size and every file's size and SHA-256.
Reading checks each file against `COMPLETE` and raises `CheckpointError` naming the file otherwise. Nothing is
unpickled: whoever can write the volume cannot make a reader run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file, save_file

from k2_workers.train import checkpoint_codec as codec

COMPLETE_MARKER = "COMPLETE"
FORMAT = "k2-checkpoint-v2"
TENSORS_FILE = "tensors.safetensors"
OPTIMIZER_FILE = "optimizer.json"
DELETING_PREFIX = ".deleting-"

FileContent = str | dict[str, torch.Tensor]  # JSON text, or tensors for a safetensors file


class CheckpointError(Exception):
    """A checkpoint is incomplete or corrupt: a file is missing, has the wrong size or hash, or does not parse."""


def shard_file(tag: str | None) -> str:
    return TENSORS_FILE if tag is None else f"tensors.{tag}.safetensors"


def extra_file(rank: int) -> str:
    return f"extra.rank{rank}.json"


def files_file(rank: int) -> str:
    return f"files.rank{rank}.json"


@dataclass
class TrainState:
    """What a checkpoint restores besides model weights and optimizer state."""

    step: int
    extra: dict[str, Any]  # scheduler, data position, RNG states, ...


@dataclass
class LoadedCheckpoint:
    """What one rank read from a checkpoint, checked against its marker, not yet applied."""

    path: Path
    state: TrainState
    skeleton: Any
    tensors: dict[str, torch.Tensor]


def read_marker(path: Path) -> dict[str, Any]:
    """The parsed `COMPLETE` marker; CheckpointError when it is missing, not JSON or of another format."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_bytes())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable {COMPLETE_MARKER} marker: {error}") from error
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{path}: {COMPLETE_MARKER} is not a {FORMAT} marker")
    return marker


def read_checkpoint(path: Path, rank: int, shard_tag: str | None) -> LoadedCheckpoint:
    """Reads and checks the files `rank` needs; CheckpointError naming the first bad one. Never runs code from the
    volume: JSON and safetensors only."""
    listed: dict[str, Any] = read_marker(path)["files"]
    extra_name = extra_file(rank) if extra_file(rank) in listed else extra_file(0)
    skeleton = _decode(path / OPTIMIZER_FILE, _read_json(path, OPTIMIZER_FILE, listed))
    extra = _decode(path / extra_name, _read_json(path, extra_name, listed))
    if not isinstance(extra, dict) or not isinstance(extra.get("step"), int):
        raise CheckpointError(f"{path / extra_name}: no step")
    tensors = _read_tensors(path, TENSORS_FILE, listed)
    if shard_tag is not None:
        if shard_file(shard_tag) not in listed:
            raise ValueError(f"checkpoint {path}: no expert shards {shard_tag!r} (saved with another parallelism?)")
        tensors |= _read_tensors(path, shard_file(shard_tag), listed)
    return LoadedCheckpoint(path, TrainState(step=extra.pop("step"), extra=extra), skeleton, tensors)


def apply_checkpoint(loaded: LoadedCheckpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copies what `read_checkpoint` returned into the model and optimizer; ValueError (missing optimizer state) or
    torch's RuntimeError (missing or misshapen weights) when it does not fit them."""
    model_state = {k.removeprefix("model."): v for k, v in loaded.tensors.items() if k.startswith("model.")}
    optim_state = {k.removeprefix("optim."): v for k, v in loaded.tensors.items() if k.startswith("optim.")}
    missing = [ref for ref in codec.tensor_refs(loaded.skeleton) if ref not in optim_state]
    if missing:
        raise ValueError(f"checkpoint {loaded.path}: no optimizer tensor {missing[0]!r} (saved with another model?)")
    model.load_state_dict(model_state)
    optimizer.load_state_dict(codec.join_tensors(loaded.skeleton, optim_state))


def write_rank_files(directory: Path, rank: int, files: Mapping[str, FileContent]) -> None:
    """Writes this rank's files durably, then `files.rank<r>.json` with their sizes and hashes."""
    listed: dict[str, dict[str, Any]] = {}
    for name, content in files.items():
        path = directory / name
        if isinstance(content, str):
            write_durably(path, content)
        else:
            save_file(_standalone(content), str(path))
            _fsync_file(path)
        listed[name] = _describe(path)
    write_durably(directory / files_file(rank), json.dumps(listed, indent=1) + "\n")


def _standalone(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors that each own their whole storage (safetensors refuses views and tensors sharing memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write_marker(directory: Path, step: int, world_size: int) -> None:
    """Merges every rank's `files.rank<r>.json` into `COMPLETE`, written durably: the checkpoint is complete."""
    files: dict[str, Any] = {}
    for rank in range(world_size):
        files |= json.loads((directory / files_file(rank)).read_text())
    marker = {"format": FORMAT, "step": step, "world_size": world_size, "time": time.time(), "files": files}
    write_durably(directory / COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")


def _describe(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _checked(path: Path, name: str, listed: Mapping[str, Any]) -> Path:
    """`path/name` after checking it against the marker's entry; CheckpointError otherwise."""
    file = path / name
    if name not in listed:
        raise CheckpointError(f"{file}: not listed in {COMPLETE_MARKER}")
    expected = listed[name]
    try:
        actual = _describe(file)
    except OSError as error:
        raise CheckpointError(f"{file}: {error.strerror or error}") from error
    if actual["bytes"] != expected.get("bytes"):
        raise CheckpointError(f"{file}: {actual['bytes']} bytes, {COMPLETE_MARKER} says {expected.get('bytes')}")
    if actual["sha256"] != expected.get("sha256"):
        raise CheckpointError(f"{file}: SHA-256 differs from {COMPLETE_MARKER}'s")
    return file


def _read_json(path: Path, name: str, listed: Mapping[str, Any]) -> Any:
    file = _checked(path, name, listed)
    try:
        return json.loads(file.read_bytes())
    except ValueError as error:
        raise CheckpointError(f"{file}: not JSON ({error})") from error


def _decode(file: Path, value: Any) -> Any:
    try:
        return codec.from_json(value)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: not checkpoint JSON ({error})") from error


def _read_tensors(path: Path, name: str, listed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    file = _checked(path, name, listed)
    try:
        return load_file(str(file))
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file}: not a safetensors file ({error})") from error


def move_aside(path: Path) -> Path:
    """Renames `path` to a `.deleting-` name beside it (atomic: the checkpoint stops counting at once)."""
    aside = path.with_name(f"{DELETING_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def delete_dir(path: Path) -> None:
    """Rename, then remove: a crash in between leaves a `.deleting-` directory, never a half-deleted checkpoint."""
    shutil.rmtree(move_aside(path), ignore_errors=True)


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    _fsync_file(path)
