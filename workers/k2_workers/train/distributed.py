"""Process-group setup from the torchrun-compatible env, and the collectives the training loop uses.

The operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK and NODE_RANK in every pod, as torchrun does
for its workers; without them the worker runs as a single process with no process group. gloo on CPU, nccl on GPU.
Every collective has a timeout, so when a rank dies the others fail within a bound instead of hanging, and the
operator's gang restart can proceed. Checkpoint waits use their own group (`checkpoint_group`), with a timeout sized
for the checkpoint (train/checkpoint.py: `K2_CHECKPOINT_TIMEOUT_S`, `K2_CHECKPOINT_MIN_MBPS`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2_api.contract import TorchrunEnv
from k2_workers import rendezvous

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun env; (0, 0, 1) without it."""
    world_size = int(env.get(TorchrunEnv.WORLD_SIZE, "1"))
    rank = int(env.get(TorchrunEnv.RANK, "0"))
    local_rank = int(env.get(TorchrunEnv.LOCAL_RANK, "0"))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def init_distributed(device_kind: str, timeout_s: float, env: Mapping[str, str] = os.environ) -> DistEnv:
    """Picks the device (`auto`: cuda when available) and joins the process group when WORLD_SIZE > 1."""
    rank, local_rank, world_size = read_env(env)
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        rendezvous.listen_on_master(rank, world_size, timeout_s, env)
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
        log.info("rank %d/%d joined the %s process group (timeout %.0f s)", rank, world_size, backend, timeout_s)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def checkpoint_group(timeout_s: float) -> dist.ProcessGroup | None:
    """Collective: a gloo group of all ranks whose collectives wait up to `timeout_s`, for waits on storage (a
    checkpoint's barriers), which can take far longer than a step; the main group keeps its short timeout, so a dead
    or hung peer is still noticed within it during training. None without a process group of several ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    assert isinstance(group, dist.ProcessGroup)
    return group


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In place; a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def all_reduce_gradients_(
    params: Iterable[torch.nn.Parameter],
    group: dist.ProcessGroup | None = None,
    divisor: int | None = None,
    bucket_bytes: int = 64 << 20,
) -> None:
    """Sum gradients over the ranks of `group` (default: all) in flat buckets, one all-reduce per bucket, and divide
    by `divisor` (default: the group's size, i.e. average). A parameter without a gradient counts as zero, so every
    rank takes part in the same collectives."""
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size(group) if divisor is None else divisor
    if dist.get_world_size(group) == 1 and world_size == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        grad = p.grad
        assert grad is not None
        if bucket and (size + grad.numel() * grad.element_size() > bucket_bytes or grad.dtype != bucket[0].dtype):
            _reduce_bucket(bucket, world_size, group)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
    if bucket:
        _reduce_bucket(bucket, world_size, group)


def _reduce_bucket(grads: list[torch.Tensor], divisor: int, group: dist.ProcessGroup | None) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.div_(divisor)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def check_replicas_identical(module: torch.nn.Module, exclude: Collection[str] = ()) -> None:
    """Raises RuntimeError naming the first tensor of the state dict whose value differs between ranks (data-parallel
    replicas, the router biases included, must stay bitwise identical; per-step statistics kept in non-persistent
    buffers are rank-local and not compared). Two all-reduces of per-tensor fingerprints."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    named = [(k, v) for k, v in module.state_dict().items() if k not in exclude]
    with torch.no_grad():
        fingerprints = torch.stack(
            [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for _, t in named]
        ).cpu()
    low, high = fingerprints.clone(), fingerprints.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differs = (low != high).any(dim=1).nonzero()
    if len(differs):
        raise RuntimeError(f"data-parallel replicas diverged: {named[int(differs[0])][0]} differs between ranks")
