"""Rank 0 writes training progress to the K2Training status subresource, through `k2_workers.incluster`.

In a pod it uses the ServiceAccount token and CA and the env the operator sets: KUBERNETES_SERVICE_HOST/PORT (set by
Kubernetes), K2_TRAINING_NAME and K2_NAMESPACE (set by the operator; the namespace falls back to the ServiceAccount's).
Anywhere else reporting is skipped quietly. Writes are a JSON merge patch of `status.progress` only, sent from a
background thread at most once per `min_interval_s` (a forced report, e.g. after a checkpoint, skips the wait), so a
slow API server never stalls training and other status fields (the operator's conditions) are left alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from k2_api import API_VERSION, K2Training
from k2_api.contract import Env
from k2_workers.incluster import SERVICE_ACCOUNT_DIR, InClusterClient

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any]], None]


def progress_record(
    step: int,
    loss: float,
    tokens_per_second: float,
    max_attention_logit: float,
    last_checkpoint: str | None = None,
    last_checkpoint_step: int | None = None,
    now: datetime.datetime | None = None,
    checkpoint_fallback: dict[str, Any] | None = None,
    dropped_token_rate: float | None = None,
) -> dict[str, Any]:
    """The `status.progress` object (camelCase, as in the K2Training API). `checkpoint_fallback` (`Resume.status()`
    of this run's resume) is always sent, null included: a gang that resumed from its newest checkpoint clears the
    record an earlier attempt left, and with it the operator's CheckpointFallback condition."""
    updated = now or datetime.datetime.now(datetime.UTC)
    progress: dict[str, Any] = {
        "step": step,
        "loss": round(loss, 6),
        "tokensPerSecond": round(tokens_per_second, 1),
        "maxAttentionLogit": round(max_attention_logit, 4),
        "updatedAt": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if dropped_token_rate is not None:  # Switch-style capacity only
        progress["droppedTokenRate"] = round(dropped_token_rate, 6)
    if last_checkpoint is not None:
        progress["lastCheckpoint"] = last_checkpoint
        progress["lastCheckpointStep"] = last_checkpoint_step
    progress["checkpointFallback"] = checkpoint_fallback
    return progress


def status_path(namespace: str, name: str) -> str:
    return f"/apis/{API_VERSION}/namespaces/{namespace}/{K2Training.PLURAL}/{name}/status"


def progress_sender(client: InClusterClient, name: str) -> Sender:
    """Merge-patch `{"status": {"progress": ...}}` into the named K2Training."""
    path = status_path(client.namespace, name)
    return lambda progress: client.merge_patch(path, {"status": {"progress": progress}})


class StatusReporter:
    """Sends the latest progress from a daemon thread, throttled; never raises into the training loop."""

    def __init__(self, send: Sender, min_interval_s: float = 10.0) -> None:
        self._send = send
        self._min_interval_s = min_interval_s
        self._pending: dict[str, Any] | None = None
        self._force = False
        self._closed = False
        self._last_sent = -float("inf")
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="k2-status", daemon=True)
        self._thread.start()

    def report(self, progress: dict[str, Any], force: bool = False) -> None:
        with self._cond:
            self._pending = progress
            self._force = self._force or force
            self._cond.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is pending now, then stop."""
        with self._cond:
            self._closed = True
            self._force = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    wait_s = self._last_sent + self._min_interval_s - time.monotonic()
                    ready = self._pending is not None and (self._force or wait_s <= 0)
                    if ready or (self._closed and self._pending is None):
                        break
                    self._cond.wait(timeout=None if self._pending is None else max(wait_s, 0.01))
                if self._pending is None:
                    return
                progress, self._pending, self._force = self._pending, None, False
            try:
                self._send(progress)
            except Exception as error:  # the API server may be briefly unavailable; the next report retries
                log.warning("status update failed: %s", error)
            self._last_sent = time.monotonic()


def reporter_from_env(
    env: Mapping[str, str] = os.environ, min_interval_s: float = 10.0, service_account_dir: Path = SERVICE_ACCOUNT_DIR
) -> StatusReporter | None:
    """A reporter when running in a cluster with the K2Training known, else None (quietly)."""
    client = InClusterClient.from_env(env, service_account_dir)
    name = env.get(Env.TRAINING_NAME)
    if client is None or not name:
        log.debug("not in a cluster or K2Training unknown: status reporting off")
        return None
    return StatusReporter(progress_sender(client, name), min_interval_s)
