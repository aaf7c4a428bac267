"""Rendezvous whose store listens on one address: the node's (127.0.0.1 on a local instance), never all interfaces.

torch's env:// rendezvous starts rank 0's TCPStore server on every interface. A multi-tenant server already running
in the process on the same port is reused instead, so rank 0 starts one first, on a socket it bound itself
(`master_listen_fd`); `init_process_group(init_method="env://")` afterwards, in the pods' own code, finds it.
"""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


class StoreServer:
    """Rank 0's TCPStore server on `host`, on a port the kernel picked; lives as long as this object."""

    def __init__(self, host: str, world_size: int, timeout_s: float) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.bind((host, 0))
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

    def close(self) -> None:
        self._socket.close()
