"""Rank 0's rendezvous store on one address, never on all interfaces.

torch's env:// and tcp:// rendezvous start rank 0's TCPStore server on every interface (`*:MASTER_PORT`), whatever
MASTER_ADDR says. A multi-tenant server already running in the process on the same port is reused instead, so rank 0
starts one first, on a socket it bound itself (`master_listen_fd`), and `init_process_group` afterwards finds it.

Pods name their master by DNS (the first pod's name): there the store keeps torch's default, inside the pod's own
network namespace. A master given as an address (127.0.0.1 for the host's multi-process runs and tests, a node's
address on Ray) is listened on alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import weakref
from collections.abc import Mapping

import torch.distributed as dist

from k2_api.contract import TorchrunEnv

# Every live server of this process by port, and those of `listen_on_master`, kept for the process's life as torch
# keeps its own (the process group's store dies with its server).
_running: weakref.WeakValueDictionary[int, StoreServer] = weakref.WeakValueDictionary()
_held: list[StoreServer] = []


class StoreServer:
    """Rank 0's TCPStore server on `host`:`port` (0: a port the kernel picks); lives as long as this object."""

    def __init__(self, host: str, world_size: int, timeout_s: float, port: int = 0) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(max(64, world_size))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._store = dist.TCPStore(  # type: ignore[attr-defined]
            host,
            self.port,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
            multi_tenant=True,
            master_listen_fd=self._socket.fileno(),
        )
        _running[self.port] = self

    def close(self) -> None:
        self._socket.close()


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def listen_on_master(rank: int, world_size: int, timeout_s: float, env: Mapping[str, str]) -> StoreServer | None:
    """On rank 0 of a group whose MASTER_ADDR is an address, starts the store on MASTER_ADDR:MASTER_PORT only, before
    `init_process_group(init_method="env://")`, unless one of this process runs there already (a Ray rank's);
    None elsewhere (other ranks, one rank, a master named by DNS, or under torchrun, whose agent runs the store)."""
    host = env.get(TorchrunEnv.MASTER_ADDR, "")
    if rank != 0 or world_size < 2 or not is_address(host) or env.get(TorchrunEnv.USE_AGENT_STORE) == "True":
        return None
    port = int(env[TorchrunEnv.MASTER_PORT])
    if port in _running:
        return _running[port]
    server = StoreServer(host, world_size, timeout_s, port=port)
    _held.append(server)
    return server
