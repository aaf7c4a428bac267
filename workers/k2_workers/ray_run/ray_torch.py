"""Ray Train's torch setup with our rendezvous: `TorchConfig` minus its process-group setup, which binds rank 0's
store on every interface; each rank joins the group in the training function instead (`join_group`), with rank 0's
store on its node's address (rendezvous.StoreServer) and the torchrun env the pods get."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.collective
import torch
import torch.distributed as dist
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

from k2_api.contract import TorchrunEnv
from k2_workers.ray_run.rank_actor import node_address
from k2_workers.rendezvous import StoreServer


class _NoGroupBackend(Backend):
    """Starts nothing: the training function joins the group (join_group); ray.train's defaults do the rest."""


@dataclass
class RankJoinsConfig(TorchConfig):
    """TorchConfig (device per worker, backend name, timeout) whose workers join the group themselves."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _NoGroupBackend


def join_group(backend: str, timeout_s: float) -> StoreServer | None:
    """Sets the torchrun env from Ray Train's context and joins the default group (world > 1); rank 0 returns its
    store server, to keep until the group is destroyed."""
    context: Any = ray.train.get_context()
    rank, world_size = int(context.get_world_rank()), int(context.get_world_size())
    os.environ.update(
        {
            TorchrunEnv.RANK: str(rank),
            TorchrunEnv.WORLD_SIZE: str(world_size),
            TorchrunEnv.LOCAL_RANK: str(context.get_local_rank()),
            TorchrunEnv.LOCAL_WORLD_SIZE: str(context.get_local_world_size()),
            TorchrunEnv.NODE_RANK: str(context.get_node_rank()),
        }
    )
    if world_size == 1:
        return None
    server = StoreServer(node_address(), world_size, timeout_s) if rank == 0 else None
    host, port = ray.train.collective.broadcast_from_rank_zero(None if server is None else (server.host, server.port))
    os.environ.update({TorchrunEnv.MASTER_ADDR: host, TorchrunEnv.MASTER_PORT: str(port)})
    device = torch.device("cuda", int(context.get_local_rank())) if backend == "nccl" else None
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device,
    )
    return server
