"""The driver of a K2Serving on Ray: one placement group of rank actors per group, each group forming the same
torch.distributed group the pods form and running the same engine, and the pods' frontend on this machine routing
requests across the groups' rank 0. A group whose rank died (or that broke) is re-formed in its placement group while
the others serve. Every spec.eplb.intervalSeconds the EPLB loop (`eplb_loop`) reads the ranks' load counters and
their placement generations, plans with the EPLB controller's planner, hands a new placement to every group's rank 0,
and the driver prints the live summary (groups ready, balancedness, moves, requests). Runs until SIGINT or SIGTERM,
then stops the groups."""

from __future__ import annotations

import json
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

from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2_api.contract import HttpPaths
from k2_api.serving import K2Serving
from k2_eplb.topology import RankNode, ranks_per_node
from k2_workers.ray_run.eplb_loop import EplbLoop, RankReport, Summary
from k2_workers.ray_run.rank_actor import RankActor, RankAddress
from k2_workers.ray_run.request_counts import RequestCounts, counted
from k2_workers.ray_run.serve_plan import ServePlan
from k2_workers.serve.endpoints import HttpServer, serve_routes
from k2_workers.serve.frontend import GroupRouter, frontend_routes
from k2_workers.serve.group_wait import GroupWait
from k2_workers.serve.http_routes import HttpLimits

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
SUPERVISE_S = 1.0
PLACE_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 5.0


@dataclass
class Group:
    index: int
    placement_group: PlacementGroup
    ranks: list[Any]  # RankActor handles, rank order
    serving: list[Any]  # the ranks' `serve` calls (ObjectRefs)
    addresses: list[RankAddress]  # rank order; rank 0's HTTP port is the group's (`url`)
    directories: list[str]  # the ranks' manifest directories

    @property
    def url(self) -> str:
        """Rank 0's HTTP: the group's endpoint behind the frontend."""
        return self.http_urls[0]

    @property
    def http_urls(self) -> list[str]:
        return [f"http://{a.host}:{a.http_port}" for a in self.addresses]

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://{a.host}:{a.metrics_port}/metrics" for a in self.addresses]


def start_group(document: dict[str, Any], plan: ServePlan, index: int, seed: int, placement: str) -> Group:
    """Reserves the group's bundles (all or none), then starts its ranks there (start_ranks)."""
    import ray

    pg = placement_group(plan.bundles, strategy=plan.placement_strategy, name=f"{plan.name}-group-{index}")
    ray.get(pg.ready())
    return start_ranks(document, plan, index, seed, pg, placement)


def start_ranks(
    document: dict[str, Any],
    plan: ServePlan,
    index: int,
    seed: int,
    pg: PlacementGroup,
    placement: str,
    http_port: int = 0,
) -> Group:
    """A rank actor in each bundle of `pg`, rank 0 starting on the placement file `placement`, and the ranks'
    `serve`; rank 0 on `http_port` when given (a re-formed group keeps its URL: its bundles stay on their nodes)."""
    import ray

    actor_class: Any = ray.remote(RankActor)
    ranks = [
        actor_class.options(
            max_concurrency=3,  # `stop` and `place` while `serve` runs
            num_cpus=plan.cpus_per_rank,
            num_gpus=1 if plan.use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=r),
        ).remote(document, index, r, plan.ranks_per_group, placement if r == 0 else None)
        for r in range(plan.ranks_per_group)
    ]
    addresses: list[RankAddress] = ray.get([rank.address.remote() for rank in ranks])
    directories = ray.get([rank.directory.remote() for rank in ranks])
    if http_port:
        addresses[0] = addresses[0]._replace(http_port=http_port)
    master, master_port = addresses[0].host, addresses[0].store_port
    serving = [
        rank.serve.remote(master, master_port, address.http_port, address.metrics_port, seed)
        for rank, address in zip(ranks, addresses, strict=True)
    ]
    return Group(index, pg, ranks, serving, addresses, directories)


def remove_directories(group: Group) -> None:
    """The manifests of killed ranks (a rank that stops removes its own); only where the driver's machine has them."""
    for directory in group.directories:
        shutil.rmtree(directory, ignore_errors=True)


def ended(group: Group) -> bool:
    """Whether a rank of the group ended: its actor died, or the group broke (every rank then returns)."""
    import ray

    finished, _ = ray.wait(group.serving, timeout=0)
    return bool(finished)


def reform(document: dict[str, Any], plan: ServePlan, group: Group, seed: int, placement: str) -> Group:
    """The group's ranks replaced by new actors in the same placement group, starting on the placement file
    `placement`; rank 0 keeps the group's URL."""
    import ray

    for rank in group.ranks:
        ray.kill(rank)
    ray.wait(group.serving, num_returns=len(group.serving), timeout=STOP_TIMEOUT_S)  # the old ranks are gone
    remove_directories(group)
    port = group.addresses[0].http_port
    return start_ranks(document, plan, group.index, seed, group.placement_group, placement, http_port=port)


def supervise(
    document: dict[str, Any],
    plan: ServePlan,
    groups: list[Group],
    seed: int,
    loop: EplbLoop,
    stop: threading.Event,
    err: TextIO,
) -> None:
    """Until `stop`: a group whose rank ended is re-formed, on the placement in force; the other groups keep serving
    meanwhile (the frontend routes around a group that refuses or answers 503)."""
    while not stop.wait(SUPERVISE_S):
        for i, group in enumerate(groups):
            if stop.is_set() or not ended(group):
                continue
            print(f"group {group.index}: a rank ended; re-forming the group", file=err, flush=True)
            groups[i] = reform(document, plan, group, seed, loop.document)
            try:
                wait_ready([groups[i]], READY_TIMEOUT_S)
            except RuntimeError as error:
                print(f"group {group.index}: {error}", file=err, flush=True)
                continue
            print(f"group {group.index} re-formed, serving again on {groups[i].url}", file=err, flush=True)


def ready(url: str) -> bool:
    return health(url) is not None


def health(url: str) -> dict[str, Any] | None:
    """A rank's /healthz answer when it is 200 (serving, a placement applied), else None."""
    try:
        with urllib.request.urlopen(url + HttpPaths.HEALTHZ, timeout=HEALTH_TIMEOUT_S) as response:
            answer = json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def rank_reports(groups: Sequence[Group]) -> list[RankReport]:
    """The placement generation every rank of every group reports on /healthz (None when it does not answer 200)."""
    reports = []
    for group in groups:
        for rank, url in enumerate(group.http_urls):
            answer = health(url)
            generation = answer.get("placementGeneration") if answer else None
            reports.append(RankReport(group.index, rank, generation if isinstance(generation, int) else None))
    return reports


def gpus_per_node(groups: Sequence[Group], plan: ServePlan) -> int | None:
    """Ranks per node of the groups (`k2_eplb.topology.ranks_per_node`, from the nodes Ray put the actors on), as the
    controller derives it from the rank pods' nodes."""
    placed = [RankNode(str(g.index), r, a.host) for g in groups for r, a in enumerate(g.addresses)]
    per_node = ranks_per_node(placed, plan.ranks_per_group, plan.groups)
    return per_node if per_node is not None and plan.ranks_per_group % per_node == 0 else None


def place(groups: Sequence[Group], reports: Sequence[RankReport], loop: EplbLoop) -> None:
    """The placement in force to the rank 0 of every group that does not report it yet (a dead rank is left to the
    supervisor; the next pass tries again)."""
    import ray

    behind = {r.group for r in reports if r.rank == 0 and r.generation != loop.generation}
    refs = [g.ranks[0].place.remote(loop.document) for g in groups if g.index in behind]
    try:
        ray.get(refs, timeout=PLACE_TIMEOUT_S)
    except RayError as error:
        log.warning("a placement did not reach a group: %s", error)


def balance(
    loop: EplbLoop,
    plan: ServePlan,
    groups: list[Group],
    counts: RequestCounts,
    stop: threading.Event,
    out: TextIO,
    json_lines: bool,
) -> None:
    """Until `stop`, every spec.eplb.intervalSeconds: one EPLB pass (`balance_once`). A pass that fails is logged
    with its traceback and the next one tries again, as the controller does: a bug must not stop the balancer."""
    while not stop.wait(loop.serving.spec.eplb.interval_seconds):
        try:
            summary = balance_once(loop, plan, list(groups), counts)  # a copy: the supervisor replaces groups
        except Exception:
            log.exception("eplb pass failed")
            continue
        print(json.dumps(summary.record()) if json_lines else summary.line(), file=out, flush=True)


def balance_once(loop: EplbLoop, plan: ServePlan, groups: Sequence[Group], counts: RequestCounts) -> Summary:
    """The ranks' generations, a planning pass on their load, the placement in force to the groups behind it, and
    the summary of it all."""
    reports = rank_reports(groups)
    step = loop.step([url for g in groups for url in g.metrics_urls], reports, gpus_per_node(groups, plan))
    place(groups, reports, loop)
    ready_groups = {r.group for r in reports if r.rank == 0 and r.generation is not None}
    served, failed = counts.served, counts.failed
    return Summary(plan.name, len(ready_groups), plan.groups, step, loop.rebalances, loop.moved_experts, served, failed)


def start_frontend(groups: Sequence[Group], plan: ServePlan, counts: RequestCounts) -> HttpServer:
    """The pods' frontend (`k2_workers.serve.frontend`, without gRPC) across the groups' rank 0, listening when
    this returns, its generation requests counted for the summary."""
    router = GroupRouter([g.url for g in groups], wait=GroupWait())
    return serve_routes(counted(frontend_routes(router), counts), plan.host, plan.port, HttpLimits())


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


def run_serving(
    document: dict[str, Any],
    plan: ServePlan,
    *,
    seed: int = 0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    json_lines: bool = False,
) -> int:
    stop = threading.Event()
    # One name for the run: the ranks label their metrics with it and the EPLB loop selects them by it.
    document = {**document, "metadata": {**document.get("metadata", {}), "name": plan.name}}
    loop = EplbLoop(K2Serving.model_validate(document))
    counts = RequestCounts()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    groups: list[Group] = []
    try:
        groups = [start_group(document, plan, g, seed, loop.document) for g in range(plan.groups)]
        wait_ready(groups, READY_TIMEOUT_S)
        frontend = start_frontend(groups, plan, counts)
        print(
            f"{plan.name}: {plan.groups} groups x {plan.ranks_per_group} ranks on Ray; "
            f"frontend on http://{plan.host}:{plan.port}",
            file=err,
            flush=True,
        )
        threads = [
            threading.Thread(
                target=supervise, args=(document, plan, groups, seed, loop, stop, err), name="k2-ray-supervise"
            ),
            threading.Thread(
                target=balance, args=(loop, plan, groups, counts, stop, out, json_lines), name="k2-ray-eplb"
            ),
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        stop.wait()
        frontend.shutdown()
        for thread in threads:
            thread.join()
        return 0
    finally:
        stop_groups(groups)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
