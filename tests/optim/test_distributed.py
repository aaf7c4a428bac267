"""all_reduce_max: identity without a process group, element-wise max across ranks with one."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2_workers.optim import all_reduce_max


def test_identity_without_process_group() -> None:
    x = torch.tensor([[1.0, 5.0]])
    assert all_reduce_max(x) is x


def _worker(rank: int, store_path: str, out_path: str) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        local = torch.tensor([[1.0, 8.0], [3.0, -1.0]]) if rank == 0 else torch.tensor([[2.0, 7.0], [0.0, 4.0]])
        before = local.clone()
        reduced = all_reduce_max(local)
        assert torch.equal(local, before)  # the input is not modified
        torch.save(reduced, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_max_across_two_ranks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"out.{rank}"), torch.tensor([[2.0, 8.0], [3.0, 4.0]]))
