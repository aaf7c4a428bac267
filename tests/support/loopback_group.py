"""Process groups of the tests' own ranks, whose rendezvous store listens on 127.0.0.1 only.

torch's tcp:// and env:// rendezvous start rank 0's store on every interface; `k2_workers.rendezvous` starts it on the
master's address first, as the workers' own code does wherever MASTER_ADDR is an address.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from k2_api.contract import TorchrunEnv
from k2_workers import rendezvous

LOOPBACK = "127.0.0.1"


def init_loopback_group(rank: int, world_size: int, port: int, timeout_s: float = 1800.0) -> None:
    """`init_process_group` over tcp://127.0.0.1:`port`, with rank 0's store on 127.0.0.1 alone."""
    env = {TorchrunEnv.MASTER_ADDR: LOOPBACK, TorchrunEnv.MASTER_PORT: str(port)}
    rendezvous.listen_on_master(rank, world_size, timeout_s, env)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{LOOPBACK}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
