"""Checkpoints hold no pickle: a payload planted on the volume is never executed, and loading it fails clearly."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from k2_workers.train.checkpoint import CheckpointManager
from k2_workers.train.checkpoint_files import COMPLETE_MARKER, CheckpointError


class _Payload:
    """Unpickling this creates the directory `marker`: proof that code from the volume ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_pickle_payload_in_every_checkpoint_file_is_never_executed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = CheckpointManager(tmp_path / "ckpt").save(1, model, optimizer, {"data": {"consumed_samples": 2}})
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Payload(marker))
    planted = [f for f in path.iterdir() if f.name != COMPLETE_MARKER]
    assert planted
    for file in planted:
        file.write_bytes(payload)
    with pytest.raises(Exception):  # noqa: B017 (what matters is that nothing ran; the error type is tested below)
        CheckpointManager(tmp_path / "ckpt").load(path, model, optimizer)
    assert not marker.exists()


def _plant(path: Path, name: str, content: bytes) -> None:
    """Replace one file and fix its entry in the marker, as someone with write access to the volume could."""
    (path / name).write_bytes(content)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    marker["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (path / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("name", ["extra.rank0.json", "optimizer.json"])
def test_a_pickle_where_extras_live_is_refused_as_not_json(tmp_path: Path, name: str) -> None:
    model, optimizer = _model_and_optimizer()
    path = CheckpointManager(tmp_path / "ckpt").save(1, model, optimizer, {"data": {"consumed_samples": 2}})
    marker = tmp_path / "code-ran"
    _plant(path, name, pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=name):
        CheckpointManager(tmp_path / "ckpt").load(path, model, optimizer)
    assert not marker.exists()


def test_extras_are_json_files_and_round_trip_tuples_and_integer_keys(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    extra = {"rng": {"python": (3, (1, 2, 3), None)}, "by_layer": {0: [1.5, float("inf")]}, "name": "x"}
    path = CheckpointManager(tmp_path).save(7, model, optimizer, extra)
    saved = json.loads((path / "extra.rank0.json").read_text())  # plain JSON a person can read
    assert saved["step"] == 7 and saved["name"] == "x"

    fresh, fresh_optimizer = _model_and_optimizer()
    state = CheckpointManager(tmp_path).load(path, fresh, fresh_optimizer)
    assert state.step == 7 and state.extra == extra
    assert fresh_optimizer.state_dict()["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple again


def test_extras_that_are_not_json_values_are_refused_when_saving(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    with pytest.raises(TypeError, match=r"extra.*'rng'.*Tensor"):
        CheckpointManager(tmp_path).save(1, model, optimizer, {"rng": torch.get_rng_state()})
