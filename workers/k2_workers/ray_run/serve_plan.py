"""What a K2Serving becomes on Ray (pure): one placement group per expert-parallel group, one bundle per rank, and
the frontend on the driver's machine.

| K2Serving | Ray |
|---|---|
| groups | placement groups, one per group (a gang each: all its ranks or none) |
| ranksPerGroup | bundles of a group's placement group, one rank actor in each |
| gpusPerRank > 0 and GPUs in the cluster | a GPU per bundle, nccl inside the group; else gloo |
| frontend.port | the frontend's HTTP port, on 127.0.0.1 unless --host says otherwise |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from k2_api.serving import K2Serving
from k2_workers.ray_run.train_plan import STRATEGIES, choose_gpu


@dataclass(frozen=True)
class ServePlan:
    name: str
    groups: int
    ranks_per_group: int
    use_gpu: bool
    cpus_per_rank: float
    placement_strategy: str
    host: str
    port: int

    @property
    def bundles(self) -> list[dict[str, float]]:
        """The resources of one group's placement group."""
        bundle = {"CPU": self.cpus_per_rank, **({"GPU": 1.0} if self.use_gpu else {})}
        return [dict(bundle) for _ in range(self.ranks_per_group)]

    @property
    def num_cpus(self) -> int:
        return math.ceil(self.groups * self.ranks_per_group * self.cpus_per_rank)


def plan_serving(
    serving: K2Serving,
    *,
    cluster_gpus: float,
    device: str = "auto",
    cpus_per_rank: float = 1.0,
    placement_strategy: str = "PACK",
    host: str = "127.0.0.1",
    port: int | None = None,
) -> ServePlan:
    spec = serving.spec
    if placement_strategy not in STRATEGIES:
        raise ValueError(f"--placement-strategy must be one of {', '.join(STRATEGIES)}, got {placement_strategy!r}")
    if cpus_per_rank <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {cpus_per_rank}")
    ranks = spec.groups * spec.ranks_per_group
    return ServePlan(
        name=serving.metadata.name or "local",
        groups=spec.groups,
        ranks_per_group=spec.ranks_per_group,
        use_gpu=choose_gpu(device, spec.gpus_per_rank, cluster_gpus, ranks),
        cpus_per_rank=cpus_per_rank,
        placement_strategy=placement_strategy,
        host=host,
        port=spec.frontend.port if port is None else port,
    )
