"""A minimal local launcher: `k2 worker train --nproc-per-node N ...` starts N ranks in this pod (or machine).

It does what a pod needs from torchrun and keeps preemption clean: each child gets RANK = NODE_RANK·N + i,
LOCAL_RANK = i and the pod's MASTER_ADDR/MASTER_PORT/WORLD_SIZE (without them: a standalone world of N ranks on
127.0.0.1). SIGTERM and SIGINT are forwarded to the children, which finish their step, checkpoint and exit 0, so the
launcher exits 0 too (torchrun exits 1 after a SIGTERM). When a child fails, the others are stopped and the launcher
returns the child's exit code, so the operator's gang restart proceeds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

from k2_api.contract import TorchrunEnv

log = logging.getLogger(__name__)

GRACE_S = 60.0  # how long stopped children may take to checkpoint before they are killed


def child_env(env: Mapping[str, str], nproc: int, local_rank: int, port: int) -> dict[str, str]:
    """The torchrun-compatible env of local rank `local_rank` (pure)."""
    node_rank = int(env.get(TorchrunEnv.NODE_RANK, "0"))
    world_size = int(env.get(TorchrunEnv.WORLD_SIZE, str(nproc)))
    if world_size % nproc != 0 or node_rank * nproc >= world_size:
        raise ValueError(f"WORLD_SIZE={world_size} does not hold node {node_rank} of {nproc} ranks per node")
    return {
        **env,
        TorchrunEnv.MASTER_ADDR: env.get(TorchrunEnv.MASTER_ADDR, "127.0.0.1"),
        TorchrunEnv.MASTER_PORT: env.get(TorchrunEnv.MASTER_PORT, str(port)),
        TorchrunEnv.WORLD_SIZE: str(world_size),
        TorchrunEnv.NODE_RANK: str(node_rank),
        TorchrunEnv.RANK: str(node_rank * nproc + local_rank),
        TorchrunEnv.LOCAL_RANK: str(local_rank),
        TorchrunEnv.LOCAL_WORLD_SIZE: str(nproc),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, worker_argv: list[str], env: Mapping[str, str] = os.environ) -> int:
    """Run N ranks of `python -m k2_workers.train worker_argv`; returns 0 only when every rank exits 0."""
    port = _free_port()
    command = [sys.executable, "-m", "k2_workers.train", *worker_argv]
    children = [subprocess.Popen(command, env=child_env(env, nproc, i, port)) for i in range(nproc)]

    def forward(signum: int, frame: FrameType | None) -> None:
        log.warning("launcher: forwarding %s to %d ranks", signal.Signals(signum).name, len(children))
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                log.error("launcher: a rank exited with %d; stopping the others", failed[0])
                _stop(children)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
