"""Connecting to Ray: a local instance started for the run (loopback only), or an existing cluster.

A local instance advertises and binds 127.0.0.1: Ray turns `_node_ip_address="127.0.0.1"` into the machine's
address unless multi-node clusters are switched off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read when `ray` is
imported), and its servers then listen on loopback only. Usage stats stay off (nothing leaves the machine).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Set before `import ray` for a local instance (Ray reads them at import): loopback only, no usage stats, none of
# Ray Train's cloud preemption watcher and metrics actors (a process each, nothing to watch on one machine), and its
# controller polling the workers every 0.5 s instead of 2 s (a local run sees its end, or a dead worker, sooner).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


@dataclass(frozen=True)
class Target:
    """Where the run goes: `address` None = a local instance with `num_cpus` logical CPUs (and the GPUs Ray finds)."""

    address: str | None
    num_cpus: int

    @property
    def local(self) -> bool:
        return self.address is None


def target(address: str | None, env: Mapping[str, str], num_cpus: int) -> Target:
    """--address, else RAY_ADDRESS, else a local instance."""
    chosen = address or env.get("RAY_ADDRESS") or None
    if num_cpus < 1:
        raise ValueError(f"--num-cpus must be >= 1, got {num_cpus}")
    return Target(address=chosen, num_cpus=num_cpus)


def on_loopback(address: str) -> bool:
    """Whether a Ray address names this machine's loopback (`127.0.0.1:6379`, `ray://localhost:10001`)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def prepare(where: Target) -> None:
    """The environment a local instance, or a driver of a cluster on loopback, needs (the driver then advertises
    127.0.0.1 too); call it before anything imports `ray`."""
    if not (where.local or (where.address is not None and on_loopback(where.address))):
        return
    if "ray" in sys.modules:
        log.warning("ray was imported before the local instance was prepared: it may advertise a non-loopback address")
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def connected(where: Target, verbose: bool = False) -> Iterator[None]:
    """ray.init for the run and ray.shutdown after it (a local instance stops with it); `prepare` first."""
    import ray

    quiet = logging.INFO if verbose else logging.WARNING
    if where.local:
        ray.init(
            address="local",  # a new instance even where a `ray start` cluster exists on this machine
            num_cpus=where.num_cpus,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            logging_level=quiet,
            log_to_driver=verbose,
        )
    else:
        ray.init(address=where.address, logging_level=quiet, log_to_driver=verbose)
    try:
        yield
    finally:
        ray.shutdown()


def gpus() -> float:
    """GPUs in the connected cluster."""
    import ray

    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return float(resources.get("GPU", 0))
