"""A serving rank as a Ray actor: the pods' `run_rank` (k2_workers.serve.rank) in the actor's process, with the
env the operator gives a rank pod (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, K2_GROUP) and flags from
the manifest. Threaded (two calls at once), so `stop` reaches a rank while `serve` runs."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from k2_api.contract import Env, TorchrunEnv

if TYPE_CHECKING:
    from k2_workers.ray_run.rendezvous import StoreServer

STORE_TIMEOUT_S = 120.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def local_device_index(gpu_ids: list[Any], all_visible: bool) -> int:
    """LOCAL_RANK: 0 when Ray masks CUDA_VISIBLE_DEVICES to this actor's GPU, else the GPU Ray assigned."""
    return int(gpu_ids[0]) if all_visible and gpu_ids else 0


def node_address() -> str:
    """The address Ray knows this node by (127.0.0.1 on a local instance)."""
    import ray

    address: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return address


class RankActor:
    def __init__(self, document: dict[str, Any], group: int, rank: int, world_size: int) -> None:
        self._group, self._rank, self._world_size = group, rank, world_size
        self._dir = tempfile.mkdtemp(prefix=f"k2-serve-g{group}r{rank}-")
        self._config = Path(self._dir) / "k2serving.yaml"
        self._config.write_text(yaml.safe_dump(document))
        self._stop = threading.Event()
        self._store: StoreServer | None = None

    def address(self) -> tuple[str, int, int]:
        """(this node's address, the rendezvous port, a free HTTP port). Rank 0 starts the group's store server here,
        on this address only; the pods' env:// rendezvous in run_rank reuses it (rendezvous.StoreServer)."""
        from k2_workers.ray_run.rendezvous import StoreServer

        host = node_address()
        if self._rank == 0 and self._store is None:
            self._store = StoreServer(host, self._world_size, STORE_TIMEOUT_S)
        return host, self._store.port if self._store is not None else 0, free_port(host)

    def serve(self, master: str, master_port: int, http_port: int, seed: int) -> int:
        """Runs the rank until `stop` (rank 0) or until rank 0 stops the group; the rank's exit code."""
        import ray

        from k2_workers.serve.cli import parse_args
        from k2_workers.serve.rank import run_rank

        all_visible = os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") == "1"
        os.environ.update(
            {
                TorchrunEnv.RANK: str(self._rank),
                TorchrunEnv.WORLD_SIZE: str(self._world_size),
                TorchrunEnv.LOCAL_RANK: str(local_device_index(ray.get_gpu_ids(), all_visible)),
                TorchrunEnv.MASTER_ADDR: master,
                TorchrunEnv.MASTER_PORT: str(master_port),
                Env.GROUP: str(self._group),
            }
        )
        host = node_address()
        argv = ["--config", str(self._config), "--host", host, "--port", str(http_port), "--seed", str(seed)]
        argv += ["--metrics-port", "-1", "--grpc-port", "-1"]
        try:
            return run_rank(parse_args(argv), self._stop)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def directory(self) -> str:
        """Where this rank keeps its manifest: the driver removes it after a kill, on the same machine."""
        return self._dir

    def stop(self) -> None:
        self._stop.set()
