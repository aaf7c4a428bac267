"""A minimal local launcher: `k2 worker train --nproc-per-node N ...` starts N ranks in this pod (or machine).

It does what a pod needs from torchrun and keeps preemption distinguishable from completion: each child gets
RANK = NODE_RANK·N + i, LOCAL_RANK = i and the pod's MASTER_ADDR/MASTER_PORT/WORLD_SIZE (without them: a standalone
world of N ranks on 127.0.0.1). SIGTERM and SIGINT are forwarded to the children, which finish their step,
checkpoint and exit `ExitCodes.PREEMPTED`. The pod's exit code (`pod_exit_code`): 0 only when every rank reached the
end, PREEMPTED when some rank was preempted and none crashed, else the first crash's code; the others are stopped
after the first crash. Each child writes its termination message to a file of its own; the launcher writes the one
that explains the pod's exit code (a crash's before a preemption's) to the pod's termination log.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from k2_api.contract import Env, ExitCodes, TorchrunEnv
from k2_workers.train.termination import write_termination_message

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


def pod_exit_code(codes: Sequence[int | None]) -> int | None:
    """The launcher's exit code from its ranks' (None: still running), or None while it must wait (pure).

    A crash (not 0, not PREEMPTED) decides at once; a negative code (killed by signal N) becomes 128 + N as a shell
    reports it. Otherwise every rank must have exited: PREEMPTED if any was, else 0.
    """
    crashed = [code for code in codes if code not in (None, ExitCodes.SUCCEEDED, ExitCodes.PREEMPTED)]
    if crashed:
        code = crashed[0]
        assert code is not None
        return code if code > 0 else 128 - code
    if any(code is None for code in codes):
        return None
    return ExitCodes.PREEMPTED if ExitCodes.PREEMPTED in codes else ExitCodes.SUCCEEDED


def launch(nproc: int, worker_argv: list[str], env: Mapping[str, str] = os.environ) -> int:
    """Run N ranks of `python -m k2_workers.train worker_argv`; returns `pod_exit_code` of their codes."""
    port = _free_port()
    command = [sys.executable, "-m", "k2_workers.train", *worker_argv]
    with tempfile.TemporaryDirectory(prefix="k2-launcher-") as scratch:
        logs = [Path(scratch) / f"rank-{i}.termination-log" for i in range(nproc)]
        children = [
            subprocess.Popen(command, env={**child_env(env, nproc, i, port), Env.TERMINATION_LOG: str(logs[i])})
            for i in range(nproc)
        ]
        code, first = _supervise(children)
        message = _pod_message([child.returncode for child in children], logs, first)
        if message:
            write_termination_message(message, env)
        return code


def _supervise(children: list[subprocess.Popen[bytes]]) -> tuple[int, list[int]]:
    """Wait for the pod's exit code; returns it and the local ranks that had exited when it was decided."""

    def forward(signum: int, frame: FrameType | None) -> None:
        log.warning("launcher: forwarding %s to %d ranks", signal.Signals(signum).name, len(children))
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [child.poll() for child in children]
            code = pod_exit_code(codes)
            if code is not None:
                break
            time.sleep(0.2)
        if any(c is None for c in codes):
            log.error("launcher: a rank exited with %d; stopping the others", code)
            _stop(children)
        return code, [i for i, c in enumerate(codes) if c is not None]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pod_message(codes: Sequence[int | None], logs: Sequence[Path], first: Sequence[int]) -> str:
    """Every crashed rank's message, the likely causes first: ranks that had exited when the crash was noticed,
    killed ones (a signal leaves no message) before those that only saw a peer vanish; else a preempted rank's."""
    crashed = [i for i, c in enumerate(codes) if c not in (None, ExitCodes.SUCCEEDED, ExitCodes.PREEMPTED)]
    crashed.sort(key=lambda i: (i not in first, (codes[i] or 0) >= 0))
    if crashed:
        return "; ".join(f"local rank {i}: {_rank_message(codes[i], logs[i])}" for i in crashed)
    preempted = [i for i, c in enumerate(codes) if c == ExitCodes.PREEMPTED]
    return logs[preempted[0]].read_text() if preempted and logs[preempted[0]].is_file() else ""


def _rank_message(code: int | None, log_file: Path) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    text = log_file.read_text() if log_file.is_file() else ""
    return text or f"exited with code {code} and no message"


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
