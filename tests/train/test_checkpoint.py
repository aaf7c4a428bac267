from pathlib import Path

import pytest
import torch

from k2_workers.train.checkpoint import (
    CheckpointManager,
    complete_checkpoints,
    latest_checkpoint,
)
from k2_workers.train.checkpoint_codec import join_tensors, split_tensors
from k2_workers.train.checkpoint_files import COMPLETE_MARKER


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model.register_buffer("router_bias", torch.randn(3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_split_and_join_tensors_round_trip() -> None:
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}}, "groups": [{"lr": 0.1, "params": [0]}]}
    skeleton, tensors = split_tensors(state)
    assert len(tensors) == 2 and all(isinstance(v, torch.Tensor) for v in tensors.values())
    joined = join_tensors(skeleton, tensors)
    assert joined["groups"] == state["groups"] and torch.equal(joined["state"][0]["m"], torch.ones(2))


def test_save_load_restores_model_optimizer_and_extras(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    _train(model, optimizer, 3)
    path = CheckpointManager(tmp_path).save(3, model, optimizer, {"data": {"consumed_samples": 24}})
    assert path == tmp_path / "step-3" and (path / COMPLETE_MARKER).is_file()

    fresh_model, fresh_optimizer = _model_and_optimizer(1)
    state = CheckpointManager(tmp_path).load(path, fresh_model, fresh_optimizer)
    assert state.step == 3 and state.extra == {"data": {"consumed_samples": 24}}
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(5)
    _train(model, optimizer, 1)
    torch.manual_seed(5)
    _train(fresh_model, fresh_optimizer, 1)  # the restored Adam moments give the identical next step
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keep_last_prunes_older_checkpoints(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, model, optimizer, {})
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]


def test_a_half_written_checkpoint_is_never_resumed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path)
    manager.save(10, model, optimizer, {})

    def crash(tmp: Path) -> None:
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        manager.save(20, model, optimizer, {}, before_rename=crash)
    assert (tmp_path / "step-20.tmp").is_dir()  # the data is there, but not complete
    (tmp_path / "step-30").mkdir()  # a final-looking directory without the marker
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"
    manager.save(20, model, optimizer, {})  # the retry replaces the stale temporary directory
    assert latest_checkpoint(tmp_path) == tmp_path / "step-20"
    assert not (tmp_path / "step-20.tmp").exists()


def test_empty_or_missing_root_has_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
