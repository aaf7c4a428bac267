"""What a K2Training becomes on Ray Train (pure): the gang's size and resources, its restart budget, its storage.

| K2Training | Ray Train |
|---|---|
| numNodes x procsPerNode | ScalingConfig.num_workers (one placement group: the gang) |
| gpusPerNode > 0 and GPUs in the cluster | ScalingConfig.use_gpu (1 GPU per worker), nccl; else gloo |
| failurePolicy.maxRestarts | FailureConfig.max_failures (whole-gang restarts) |
| metadata.name | RunConfig.name; checkpoints in <storage_path>/<name>/checkpoints unless checkpointing.uri |
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from k2_api import uris
from k2_api.training import K2Training

DEFAULT_STORAGE = "~/ray_results"  # Ray Train's own default
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainPlan:
    name: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    placement_strategy: str
    max_failures: int
    storage_path: str  # absolute
    checkpoint_dir: str  # absolute

    @property
    def run_dir(self) -> Path:
        """Ray Train's experiment directory."""
        return Path(self.storage_path) / self.name

    @property
    def device(self) -> str:
        """The RunConfig.device of every rank."""
        return "cuda" if self.use_gpu else "cpu"

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def num_cpus(self) -> int:
        """Logical CPUs a local instance needs for the gang."""
        return math.ceil(self.num_workers * self.cpus_per_worker)


def choose_gpu(device: str, gpus_per_node: int, cluster_gpus: float, num_workers: int) -> bool:
    """`cuda` asks for one GPU per worker; `auto` only when the spec asks for GPUs and the cluster has enough."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    return gpus_per_node > 0 and cluster_gpus >= num_workers


def plan_training(
    training: K2Training,
    *,
    cluster_gpus: float,
    device: str = "auto",
    storage_path: str | None = None,
    cpus_per_worker: float = 1.0,
    placement_strategy: str = "PACK",
) -> TrainPlan:
    """The Ray Train side of `training`; ValueError naming the option or field that cannot be honoured."""
    spec = training.spec
    if placement_strategy not in STRATEGIES:
        raise ValueError(f"--placement-strategy must be one of {', '.join(STRATEGIES)}, got {placement_strategy!r}")
    if cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    name = training.metadata.name or "local"
    storage = os.path.abspath(os.path.expanduser(storage_path or DEFAULT_STORAGE))
    if spec.checkpointing.uri is not None:
        checkpoint_dir = os.path.abspath(uris.local_only(spec.checkpointing.uri, "spec.checkpointing.uri"))
    else:
        checkpoint_dir = os.path.join(storage, name, "checkpoints")
    return TrainPlan(
        name=name,
        num_workers=spec.world_size,
        use_gpu=choose_gpu(device, spec.gpus_per_node, cluster_gpus, spec.world_size),
        cpus_per_worker=cpus_per_worker,
        placement_strategy=placement_strategy,
        max_failures=spec.failure_policy.max_restarts,
        storage_path=storage,
        checkpoint_dir=checkpoint_dir,
    )
