"""A serving rank as a Ray actor: the pods' `run_rank` (k2_workers.serve.rank) in the actor's process, with the
env the operator gives a rank pod (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, K2_GROUP) and flags from
the manifest. Its /metrics listens on the node's address (the EPLB loop scrapes it), and its `--placement` file lies
in the actor's own directory, written by `place` (the driver's EPLB loop calls it on rank 0), so the ranks apply
placements on any node of a cluster. Threaded, so `stop` and `place` reach a rank while `serve` runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from k2_api.contract import Env, Files, TorchrunEnv

if TYPE_CHECKING:
    from k2_workers.rendezvous import StoreServer

STORE_TIMEOUT_S = 120.0


def free_ports(host: str, count: int) -> list[int]:
    """`count` different ports free on `host` now (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def local_device_index(gpu_ids: list[Any], all_visible: bool) -> int:
    """LOCAL_RANK: 0 when Ray masks CUDA_VISIBLE_DEVICES to this actor's GPU, else the GPU Ray assigned."""
    return int(gpu_ids[0]) if all_visible and gpu_ids else 0


def node_address() -> str:
    """The address Ray knows this node by (127.0.0.1 on a local instance)."""
    import ray

    address: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    return address


def write_atomically(path: Path, text: str) -> None:
    """`text` as the whole content of `path`: written beside it, then renamed over it (a reader never sees half)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class RankAddress(NamedTuple):
    host: str  # this node's address
    store_port: int  # the group's rendezvous store (rank 0; 0 on the others)
    http_port: int
    metrics_port: int


class RankActor:
    def __init__(
        self, document: dict[str, Any], group: int, rank: int, world_size: int, placement: str | None = None
    ) -> None:
        """`placement`: the placement file the rank starts with (the one in force when a group is re-formed)."""
        self._group, self._rank, self._world_size = group, rank, world_size
        self._dir = tempfile.mkdtemp(prefix=f"k2-serve-g{group}r{rank}-")
        self._config = Path(self._dir) / "k2serving.yaml"
        self._config.write_text(yaml.safe_dump(document))
        self._placement = Path(self._dir) / Files.PLACEMENT
        if placement is not None:
            self.place(placement)
        self._stop = threading.Event()
        self._store: StoreServer | None = None

    def address(self) -> RankAddress:
        """This node's address and free ports for HTTP and /metrics. Rank 0 starts the group's store server here,
        on this address only; the pods' env:// rendezvous in run_rank reuses it (k2_workers.rendezvous)."""
        from k2_workers.rendezvous import StoreServer

        host = node_address()
        if self._rank == 0 and self._store is None:
            self._store = StoreServer(host, self._world_size, STORE_TIMEOUT_S)
        store_port = self._store.port if self._store is not None else 0
        http_port, metrics_port = free_ports(host, 2)
        return RankAddress(host, store_port, http_port, metrics_port)

    def place(self, placement: str) -> None:
        """Make `placement` (a placement file's text) this rank's `--placement` file; rank 0 applies it on its next
        poll. Unchanged content is not rewritten."""
        if not self._placement.exists() or self._placement.read_text() != placement:
            write_atomically(self._placement, placement)

    def serve(self, master: str, master_port: int, http_port: int, metrics_port: int, seed: int) -> int:
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
        argv += ["--metrics-port", str(metrics_port), "--grpc-port", "-1", "--placement", str(self._placement)]
        try:
            return run_rank(parse_args(argv), self._stop)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def directory(self) -> str:
        """Where this rank keeps its manifest: the driver removes it after a kill, on the same machine."""
        return self._dir

    def stop(self) -> None:
        self._stop.set()
