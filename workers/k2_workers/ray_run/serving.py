"""The driver of a K2Serving on Ray: one placement group of rank actors per group, each group forming the same
torch.distributed group the pods form and running the same engine, and the pods' frontend on this machine routing
requests across the groups' rank 0. A group whose rank died (or that broke) is re-formed in its placement group while
the others serve. Runs until SIGINT or SIGTERM, then stops the groups."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2_api.contract import HttpPaths
from k2_workers.ray_run.rank_actor import RankActor
from k2_workers.ray_run.serve_plan import ServePlan
from k2_workers.serve.frontend import run_frontend
from k2_workers.serve.group_wait import GroupWait

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
SUPERVISE_S = 1.0


@dataclass
class Group:
    index: int
    placement_group: PlacementGroup
    ranks: list[Any]  # RankActor handles, rank order
    serving: list[Any]  # the ranks' `serve` calls (ObjectRefs)
    url: str  # rank 0's HTTP
    directories: list[str]  # the ranks' manifest directories


def start_group(document: dict[str, Any], plan: ServePlan, index: int, seed: int) -> Group:
    """Reserves the group's bundles (all or none), then starts its ranks there (start_ranks)."""
    import ray

    pg = placement_group(plan.bundles, strategy=plan.placement_strategy, name=f"{plan.name}-group-{index}")
    ray.get(pg.ready())
    return start_ranks(document, plan, index, seed, pg)


def start_ranks(
    document: dict[str, Any], plan: ServePlan, index: int, seed: int, pg: PlacementGroup, http_port: int = 0
) -> Group:
    """A rank actor in each bundle of `pg`, and the ranks' `serve`; rank 0 on `http_port` when given (a re-formed
    group keeps its URL: its bundles stay on their nodes)."""
    import ray

    actor_class: Any = ray.remote(RankActor)
    ranks = [
        actor_class.options(
            max_concurrency=2,  # `stop` while `serve` runs
            num_cpus=plan.cpus_per_rank,
            num_gpus=1 if plan.use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=r),
        ).remote(document, index, r, plan.ranks_per_group)
        for r in range(plan.ranks_per_group)
    ]
    addresses = ray.get([rank.address.remote() for rank in ranks])
    directories = ray.get([rank.directory.remote() for rank in ranks])
    master, master_port, _ = addresses[0]
    http_ports = [http_port or addresses[0][2]] + [http for _, _, http in addresses[1:]]
    serving = [rank.serve.remote(master, master_port, port, seed) for rank, port in zip(ranks, http_ports, strict=True)]
    return Group(index, pg, ranks, serving, f"http://{master}:{http_ports[0]}", directories)


def remove_directories(group: Group) -> None:
    """The manifests of killed ranks (a rank that stops removes its own); only where the driver's machine has them."""
    for directory in group.directories:
        shutil.rmtree(directory, ignore_errors=True)


def ended(group: Group) -> bool:
    """Whether a rank of the group ended: its actor died, or the group broke (every rank then returns)."""
    import ray

    finished, _ = ray.wait(group.serving, timeout=0)
    return bool(finished)


def reform(document: dict[str, Any], plan: ServePlan, group: Group, seed: int) -> Group:
    """The group's ranks replaced by new actors in the same placement group; rank 0 keeps the group's URL."""
    import ray

    for rank in group.ranks:
        ray.kill(rank)
    ray.wait(group.serving, num_returns=len(group.serving), timeout=STOP_TIMEOUT_S)  # the old ranks are gone
    remove_directories(group)
    port = int(group.url.rsplit(":", 1)[1])
    return start_ranks(document, plan, group.index, seed, group.placement_group, http_port=port)


def supervise(
    document: dict[str, Any], plan: ServePlan, groups: list[Group], seed: int, stop: threading.Event, err: TextIO
) -> None:
    """Until `stop`: a group whose rank ended is re-formed; the other groups keep serving meanwhile (the frontend
    routes around a group that refuses or answers 503)."""
    while not stop.wait(SUPERVISE_S):
        for i, group in enumerate(groups):
            if stop.is_set() or not ended(group):
                continue
            print(f"group {group.index}: a rank ended; re-forming the group", file=err, flush=True)
            groups[i] = reform(document, plan, group, seed)
            try:
                wait_ready([groups[i]], READY_TIMEOUT_S)
            except RuntimeError as error:
                print(f"group {group.index}: {error}", file=err, flush=True)
                continue
            print(f"group {group.index} re-formed, serving again on {groups[i].url}", file=err, flush=True)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + HttpPaths.HEALTHZ, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_ready(groups: Sequence[Group], timeout_s: float) -> None:
    """Until every group's rank 0 answers /healthz 200 (its first placement applied); RuntimeError when a rank
    ended first."""
    import ray

    deadline = time.monotonic() + timeout_s
    pending = list(groups)
    while pending:
        for group in pending:
            finished, _ = ray.wait(group.serving, timeout=0)
            if finished:
                ray.get(finished)  # raises the rank's error
                raise RuntimeError(f"group {group.index}: a rank ended before the group was ready")
        pending = [g for g in pending if not ready(g.url)]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"groups {[g.index for g in pending]} not ready after {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_groups(groups: Sequence[Group]) -> None:
    import ray

    stops = [rank.stop.remote() for group in groups for rank in group.ranks]
    ray.wait(stops, num_returns=len(stops), timeout=STOP_TIMEOUT_S)  # a dead rank's call fails: not waited for
    ray.wait(
        [ref for g in groups for ref in g.serving],
        num_returns=sum(len(g.serving) for g in groups),
        timeout=STOP_TIMEOUT_S,
    )
    for group in groups:
        for rank in group.ranks:
            ray.kill(rank)
        remove_directories(group)
        remove_placement_group(group.placement_group)


def run_serving(document: dict[str, Any], plan: ServePlan, *, seed: int = 0, err: TextIO = sys.stderr) -> int:
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    groups: list[Group] = []
    try:
        groups = [start_group(document, plan, g, seed) for g in range(plan.groups)]
        wait_ready(groups, READY_TIMEOUT_S)
        print(
            f"{plan.name}: {plan.groups} groups x {plan.ranks_per_group} ranks on Ray; "
            f"frontend on http://{plan.host}:{plan.port}",
            file=err,
            flush=True,
        )
        supervisor = threading.Thread(
            target=supervise, args=(document, plan, groups, seed, stop, err), name="k2-ray-supervise", daemon=True
        )
        supervisor.start()
        code = run_frontend([g.url for g in groups], plan.host, plan.port, stop, wait=GroupWait())
        supervisor.join()
        return code
    finally:
        stop_groups(groups)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
