"""What a K2Training and a K2Serving become on Ray, and the EPLB loop's decisions there (pure, no Ray started)."""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from k2_api.contract import WeightSources
from k2_api.serving import K2Serving
from k2_api.training import K2Training
from k2_eplb.planner import Reason, Shape
from k2_workers.ray_run.cluster import on_loopback, target
from k2_workers.ray_run.eplb_loop import EplbLoop, RankReport, Summary, initial_decision, shown_bytes, window_start
from k2_workers.ray_run.rank_actor import local_device_index
from k2_workers.ray_run.request_counts import RequestCounts, counted
from k2_workers.ray_run.serve_plan import plan_serving
from k2_workers.ray_run.train_plan import choose_gpu, plan_training
from k2_workers.serve.http_routes import HttpError, Stream
from k2_workers.serve.metrics import ExpertLoadCollector
from k2_workers.serve.placement import ActivePlacement, parse_placement

from .run import manifest


def _training(tmp_path: Path, **spec: object) -> K2Training:
    document = yaml.safe_load(manifest(tmp_path).read_text())
    document["spec"].update(spec)
    return K2Training.model_validate(document)


def test_the_gang_restart_budget_and_storage_map_to_ray_train(tmp_path: Path) -> None:
    training = _training(tmp_path, numNodes=2, procsPerNode=3, failurePolicy={"maxRestarts": 5})
    plan = plan_training(training, cluster_gpus=0, storage_path=str(tmp_path / "runs"))
    assert (plan.num_workers, plan.max_failures, plan.use_gpu, plan.backend) == (6, 5, False, "gloo")
    assert plan.run_dir == tmp_path / "runs" / "k2-debug-train"
    assert Path(plan.checkpoint_dir) == plan.run_dir / "checkpoints"
    assert (plan.num_cpus, plan.placement_strategy, plan.device) == (6, "PACK", "cpu")


def test_a_checkpoint_uri_is_used_as_the_checkpoint_directory(tmp_path: Path) -> None:
    checkpointing = {"uri": f"file://{tmp_path}/ckpt", "everyNSteps": 5}
    plan = plan_training(_training(tmp_path, checkpointing=checkpointing), cluster_gpus=0, storage_path="/x")
    assert plan.checkpoint_dir == f"{tmp_path}/ckpt"


def test_gpus_only_when_asked_for_and_present() -> None:
    assert choose_gpu("auto", gpus_per_node=1, cluster_gpus=2, num_workers=2)
    assert not choose_gpu("auto", gpus_per_node=1, cluster_gpus=1, num_workers=2)
    assert not choose_gpu("auto", gpus_per_node=0, cluster_gpus=8, num_workers=2)
    assert choose_gpu("cuda", gpus_per_node=0, cluster_gpus=0, num_workers=2)
    assert not choose_gpu("cpu", gpus_per_node=8, cluster_gpus=8, num_workers=2)
    with pytest.raises(ValueError, match="--device"):
        choose_gpu("tpu", gpus_per_node=8, cluster_gpus=8, num_workers=2)


def test_bad_options_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--placement-strategy"):
        plan_training(_training(tmp_path), cluster_gpus=0, placement_strategy="ANYWHERE")
    with pytest.raises(ValueError, match="--cpus-per-worker"):
        plan_training(_training(tmp_path), cluster_gpus=0, cpus_per_worker=0)


def test_the_address_comes_from_the_flag_then_ray_address_else_a_local_instance() -> None:
    assert target("ray://a:10001", {"RAY_ADDRESS": "b:6379"}, 2).address == "ray://a:10001"
    assert target(None, {"RAY_ADDRESS": "b:6379"}, 2).address == "b:6379"
    assert target(None, {}, 2).local
    with pytest.raises(ValueError, match="--num-cpus"):
        target(None, {}, 0)


def test_each_serving_group_is_one_placement_group_of_rank_bundles() -> None:
    document = yaml.safe_load((Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml").read_text())
    plan = plan_serving(K2Serving.model_validate(document), cluster_gpus=0, cpus_per_rank=0.5)
    assert (plan.groups, plan.ranks_per_group, plan.use_gpu) == (2, 2, False)
    assert plan.bundles == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert (plan.num_cpus, plan.host, plan.port) == (2, "127.0.0.1", 8000)
    on_gpus = plan_serving(K2Serving.model_validate(document), cluster_gpus=4, port=9000)
    assert on_gpus.use_gpu and on_gpus.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2 and on_gpus.port == 9000


def test_a_rank_uses_the_gpu_ray_assigned_only_when_it_sees_them_all() -> None:
    assert local_device_index([3], all_visible=True) == 3
    assert local_device_index([3], all_visible=False) == 0  # Ray masked CUDA_VISIBLE_DEVICES to that one GPU
    assert local_device_index([], all_visible=True) == 0


def test_a_cluster_on_loopback_is_told_apart() -> None:
    assert on_loopback("127.0.0.1:6379") and on_loopback("ray://localhost:10001") and on_loopback("[::1]:6379")
    assert not on_loopback("ray://head.ray.svc:10001") and not on_loopback("10.0.0.2:6379")


def read_placement_text(text: str) -> ActivePlacement:
    """A placement file's text as the ranks read it."""
    return parse_placement(json.loads(text))


def _rebalancing_serving(**eplb: object) -> K2Serving:
    document = yaml.safe_load((Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml").read_text())
    document["spec"]["eplb"] = {"windowSeconds": 10, "cooldownSeconds": 30, "minImprovement": 0.02, **eplb}
    return K2Serving.model_validate(document)


class _Ranks:
    """The /metrics pages of the example's 4 ranks at time `now`: every token of every layer routed to one expert,
    on group `g` rank 0, counted `rate` tokens a second; each rank's slot counters follow `placement_LGS`."""

    def __init__(self, expert: int, placement_LGS: object, rate: float = 100.0) -> None:
        self.expert, self.placement_LGS, self.rate, self.now = expert, np.asarray(placement_LGS), rate, 0.0
        self.peer_bytes = 0  # expert-weight bytes each rank took in from its peers

    def page(self, url: str, timeout: float) -> str:
        group, rank = (int(part) for part in url.rsplit("/", 2)[-2].split("-"))
        num_layers, _, num_slots = self.placement_LGS.shape
        collector = ExpertLoadCollector("k2-debug-serve", group, rank, num_layers, 8, num_slots)
        expert_LE = np.zeros((num_layers, 8))
        if rank == 0:
            expert_LE[:, self.expert] = self.rate * self.now
        holders = self.placement_LGS == self.expert  # [L, G, S]
        slot_LS = holders[:, rank, :] * (self.rate * self.now / holders.sum(axis=(1, 2))[:, None])
        collector.add(expert_LE, slot_LS)
        collector.add_weight_bytes(WeightSources.PEER, self.peer_bytes)
        registry = CollectorRegistry()
        registry.register(collector)
        return generate_latest(registry).decode()


ENDPOINTS = [f"http://127.0.0.1/{g}-{r}/metrics" for g in range(2) for r in range(2)]


def _reports(generation: int | None) -> list[RankReport]:
    return [RankReport(g, r, generation) for g in range(2) for r in range(2)]


def test_the_ray_eplb_loop_plans_like_the_controller_and_waits_for_every_rank_to_apply() -> None:
    clock = [0.0]
    initial = initial_decision(Shape(3, 8, 2, 5))
    assert initial.placement_LGS is not None
    ranks = _Ranks(2, initial.placement_LGS)  # expert 2 has one replica, on rank 0: balancedness 0.5
    loop = EplbLoop(_rebalancing_serving(maxMovesFraction=1.0), clock=lambda: clock[0], fetch=ranks.page)  # 1 round
    assert loop.generation == 1 and (loop.placement_LGS == initial.placement_LGS).all()
    first = read_placement_text(loop.document)
    assert first.generation == 1 and [t.table_RS.tolist() for t in first.tables] == initial.placement_LGS.tolist()

    assert loop.step(ENDPOINTS, _reports(1)).decision.reason is Reason.TOO_FEW_SAMPLES  # one scrape so far
    clock[0] = ranks.now = 12.0
    written = loop.step(ENDPOINTS, _reports(1))
    decision = written.decision
    assert decision.reason is Reason.REBALANCED and written.generation == loop.generation == 2
    assert decision.staleness == pytest.approx(0.5) and decision.measured_balancedness == pytest.approx(0.5)
    assert decision.predicted_balancedness == pytest.approx(1.0)
    assert (loop.placement_LGS == 2).any(axis=2).all()  # the hot expert on both ranks of every layer
    assert read_placement_text(loop.document).generation == 2 and loop.rebalances == 1
    assert len(written.ranks_behind) == 4 and written.applied_generation == 1  # none runs generation 2 yet
    assert loop.moved_experts == decision.moved_experts > 0

    clock[0] = ranks.now = 14.0
    pending = loop.step(ENDPOINTS, [*_reports(2)[:3], RankReport(1, 1, 1)])
    assert pending.decision.reason is Reason.APPLY_PENDING and pending.ranks_behind == ("group 1 rank 1",)
    assert pending.applied_generation == 1 and pending.measured_generation is None
    clock[0] = ranks.now = 16.0
    cooling = loop.step(ENDPOINTS, _reports(2))
    assert cooling.decision.reason is Reason.COOLDOWN and cooling.applied_generation == 2
    assert cooling.decision.staleness == pytest.approx(decision.predicted_balancedness)  # the new one, same load

    ranks.placement_LGS, ranks.peer_bytes = loop.placement_LGS, 1000  # what the ranks run and took in to
    for t in (18.0, 20.0, 22.0, 24.0, 26.0, 28.0):
        clock[0] = ranks.now = t
        after = loop.step(ENDPOINTS, _reports(2))
    assert after.measured_generation == 2  # a whole window since every rank applied generation 2
    assert after.weight_bytes == {WeightSources.PEER: 4000.0, WeightSources.STORAGE: 0.0}
    summary = Summary("k2-debug-serve", 2, 2, after, loop.rebalances, loop.moved_experts, 7, 0)
    record = summary.record()
    assert (record["generation"], record["appliedGeneration"], record["rebalances"]) == (2, 2, 1)
    assert (record["requestsServed"], record["requestsFailed"], record["ranksBehind"]) == (7, 0, [])
    assert "groups 2/2 ready | generation 2 (applied)" in summary.line()
    assert "moves 3 in 1 rebalances (4.0 kB from peers) | requests 7 served, 0 failed" in summary.line()
    assert (shown_bytes(2.5e6), shown_bytes(3e9)) == ("2.50 MB", "3.00 GB")


def test_a_disabled_eplb_never_reads_nor_writes() -> None:
    def fetch(url: str, timeout: float) -> str:
        raise AssertionError("scraped with EPLB disabled")

    loop = EplbLoop(_rebalancing_serving(enabled=False), fetch=fetch)
    step = loop.step(ENDPOINTS, _reports(1))
    assert step.decision.reason is Reason.DISABLED and loop.generation == 1 and step.applied_generation == 1


def test_the_measured_window_starts_at_the_newest_scrape_a_window_old() -> None:
    assert window_start([0.0, 5.0, 10.0, 15.0], now=16.0, window_seconds=10) == 5.0
    assert window_start([12.0, 15.0], now=16.0, window_seconds=10) == 12.0
    assert window_start([], now=16.0, window_seconds=10) is None


def test_the_frontend_counts_answers_served_and_failed() -> None:
    def ok(body: bytes) -> tuple[int, dict[str, object]]:
        return 200, {}

    def refused(body: bytes) -> tuple[int, dict[str, object]]:
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "no group")

    def stream(body: bytes) -> Stream:
        return Stream(iter([b"a", b"b"]))

    counts = RequestCounts()
    routes = counted({("POST", "/ok"): ok, ("POST", "/no"): refused, ("POST", "/s"): stream, ("GET", "/h"): ok}, counts)
    routes[("POST", "/ok")](b"")
    routes[("GET", "/h")](b"")
    with pytest.raises(HttpError):
        routes[("POST", "/no")](b"")
    answer = routes[("POST", "/s")](b"")
    assert isinstance(answer, Stream) and list(answer.events) == [b"a", b"b"]
    assert (counts.served, counts.failed) == (2, 1)
