"""With expertParallel 2 every rank holds half the experts; the export gathers them under their logical ids: each
expert of the export is, bit for bit, the one its rank's checkpoint shard holds, and the dense weights are rank 0's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2_workers.model import load_pretrained
from k2_workers.parallel import SlotTable
from k2_workers.train.checkpoint_files import read_checkpoint
from tests.train.launch import start_ranks

pytestmark = pytest.mark.distributed

STEPS, EXPERTS, WORLD = 8, 8, 2


def test_an_expert_parallel_run_exports_every_expert_under_its_id(tmp_path: Path) -> None:
    checkpoints, export, logs = tmp_path / "ckpt", tmp_path / "export", tmp_path / "logs"
    logs.mkdir()
    args = ["--steps", str(STEPS), "--expert-parallel", str(WORLD), "--checkpoint-dir", str(checkpoints)]
    ranks = start_ranks([*args, "--export-dir", str(export), "--json"], world_size=WORLD, log_dir=logs)
    codes = [rank.wait(timeout=600) for rank in ranks]
    assert codes == [0] * WORLD, [(logs / f"rank{i}.err").read_text()[-2000:] for i in range(WORLD)]

    exported = load_pretrained(export).state_dict()
    step_dir = checkpoints / f"step-{STEPS}"
    table = SlotTable.round_robin(EXPERTS, WORLD, EXPERTS // WORLD)  # what train/parallel.py shards by
    for rank in range(WORLD):
        shard = read_checkpoint(step_dir, rank, f"ep{rank}of{WORLD}").tensors
        expert_ids = table.table_RS[rank].tolist()
        for layer in (1, 2, 3):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{projection}"
                held = shard[f"model.{name}"]
                for slot, expert in enumerate(expert_ids):
                    assert torch.equal(exported[name][expert], held[slot]), (name, expert)
    dense = read_checkpoint(step_dir, 0, "ep0of2").tensors
    checked = 0
    for key, tensor in dense.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and ".mlp.experts." not in name:
            assert torch.equal(exported[name], tensor), name
            checked += 1
    assert checked > 20
