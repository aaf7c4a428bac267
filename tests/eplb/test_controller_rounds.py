"""The controller's rounds, per-group load and topology against the adapter's fake API server (server-side apply per
field manager), with fake scrape pages."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from k2_api import ExpertPlacement, K2Serving
from k2_api.contract import Labels
from k2_api.kube import Object, Unavailable
from k2_eplb import convert
from k2_eplb import kube as api
from k2_eplb.controller import Controller
from k2_eplb.planner import Decision, Reason
from k2_eplb.rounds import plan_rounds
from k2_eplb.scrape_reader import ScrapeLoadReader
from k2_eplb.topology import POD_INDEX_LABEL
from tests.eplb.helpers import field_managers
from tests.eplb.test_controller_unit import EXPERTS, LAYERS, RANKS, Setup, placement, serving, skewed

KEY = ("ns", "k2")
COOLDOWN = 120


def one_move_serving(**spec: Any) -> Object:
    """maxMoves 1: the skewed load needs several rounds."""
    body = serving()
    body["spec"]["eplb"]["maxMoves"] = 1
    body["spec"].update(spec)
    return body


def mark_applied(setup: Setup, generation: int) -> None:
    """As the operator reports it, under its own field manager."""
    setup.cluster.client("k2-tests").apply_status(ExpertPlacement.KIND, "ns", "k2", {"appliedGeneration": generation})


def plan_status(setup: Setup) -> dict[str, Any]:
    status = setup.placement().status
    assert status is not None and status.rebalance_plan is not None
    return status.rebalance_plan.to_dict()


def test_a_plan_in_rounds_is_applied_one_generation_at_a_time_with_a_scaled_cooldown() -> None:
    setup = Setup([one_move_serving()], [placement()])
    assert setup.pass_()[KEY].reason is Reason.TOO_FEW_SAMPLES
    setup.now += 30
    first = setup.pass_()[KEY]
    assert first.reason is Reason.REBALANCED and first.moved_experts == 1
    expected = plan_rounds(
        skewed(),
        convert.placement_array(ExpertPlacement.model_validate(placement())),
        budget=1,
        epsilon=0.01,
        min_gain=0.02,
        max_rounds=8,
    )
    rounds = len(expected.rounds)
    assert rounds >= 3
    status = plan_status(setup)
    assert status == {
        "round": 1,
        "rounds": rounds,
        "generation": 2,
        "predictedBalancedness": pytest.approx(expected.final_balancedness),
        "targetBalancedness": pytest.approx(expected.target_balancedness),
        "movesPerRound": 1,
    }
    body = setup.kube.get(ExpertPlacement.KIND, "ns", "k2")
    assert body is not None and field_managers(body, "status") == {"k2-tests", api.FIELD_MANAGER}

    for round_ in range(2, rounds + 1):
        written_at = setup.now
        # Not applied yet by every rank: the next round waits, whatever the cooldown.
        setup.now += 30
        pending = setup.pass_()[KEY]
        assert pending.reason is Reason.APPLY_PENDING
        assert plan_status(setup)["round"] == round_ - 1  # the plan is still shown
        mark_applied(setup, round_)
        # Between rounds the cooldown is cooldownSeconds / rounds.
        setup.now = written_at + COOLDOWN / rounds - 1
        waiting = setup.pass_(force=True)[KEY]
        assert (waiting.reason, waiting.message) == (
            Reason.COOLDOWN,
            f"cooldown: 1s left before round {round_} of {rounds}",
        )
        setup.now = written_at + max(COOLDOWN / rounds, 60)
        decision = setup.pass_(force=True)[KEY]
        assert decision.reason is Reason.REBALANCED, decision.message
        np.testing.assert_array_equal(decision.placement_LGS, expected.rounds[round_ - 1].placement_LGS)
        assert setup.placement().spec.generation == round_ + 1
        assert plan_status(setup)["round"] == round_ and plan_status(setup)["rounds"] == rounds

    # After the last round: the full cooldown, and then nothing left to gain.
    mark_applied(setup, rounds + 1)
    setup.now += COOLDOWN - 1
    last = setup.pass_(force=True)[KEY]
    assert (last.reason, last.message) == (Reason.COOLDOWN, "cooldown: 1s left")
    setup.now += 1
    assert setup.pass_(force=True)[KEY].reason is Reason.BELOW_MIN_IMPROVEMENT
    assert plan_status(setup)["round"] == rounds
    assert [reason for _, reason in setup.events()] == ["Rebalanced"] * rounds


def restarted(setup: Setup) -> Controller:
    """A new controller process: no interval, no scrape history; only the objects remember the plan."""
    return Controller(
        setup.kube,
        endpoints=lambda s: [f"http://127.0.0.1:1/{r}" for r in range(RANKS)],
        clock=lambda: setup.now,
        scrape_reader=ScrapeLoadReader(fetch=setup.pages.fetch, clock=lambda: setup.pages.time),
    )


def test_the_plan_survives_a_controller_restart() -> None:
    setup = Setup([one_move_serving()], [placement()])
    setup.pass_()
    setup.now += 30
    first = setup.pass_()[KEY]
    rounds = plan_status(setup)["rounds"]
    mark_applied(setup, 2)
    setup.controller = restarted(setup)
    setup.now += 30
    assert setup.pass_()[KEY].reason is Reason.TOO_FEW_SAMPLES  # its reader starts without history
    setup.now += 30
    second = setup.pass_()[KEY]
    assert second.reason is Reason.REBALANCED
    assert plan_status(setup) | {"predictedBalancedness": 0, "targetBalancedness": 0} == {
        "round": 2,
        "rounds": rounds,
        "generation": 3,
        "predictedBalancedness": 0,
        "targetBalancedness": 0,
        "movesPerRound": 1,
    }
    assert first.placement_LGS is not None and second.placement_LGS is not None
    expected = plan_rounds(skewed(), first.placement_LGS, budget=1, epsilon=0.01, min_gain=0.02, max_rounds=8)
    np.testing.assert_array_equal(second.placement_LGS, expected.rounds[0].placement_LGS)


def test_a_load_shift_replans_from_the_placement_in_force() -> None:
    setup = Setup([one_move_serving()], [placement()])
    setup.pass_()
    setup.now += 30
    first = setup.pass_()[KEY]
    assert first.plan is not None and first.placement_LGS is not None
    mark_applied(setup, 2)
    shifted = np.full((LAYERS, EXPERTS), 100.0)
    shifted[:, 6] = 2000.0
    shifted[:, 1] = 900.0
    setup.now += 60
    decision = setup.pass_(shifted)[KEY]  # the 60 s window holds the last tick: the shifted load only
    assert decision.reason is Reason.REBALANCED
    replanned = plan_rounds(shifted, first.placement_LGS, budget=1, epsilon=0.01, min_gain=0.02, max_rounds=8)
    np.testing.assert_array_equal(decision.placement_LGS, replanned.rounds[0].placement_LGS)
    status = plan_status(setup)
    assert (status["round"], status["rounds"]) == (2, 1 + len(replanned.rounds))
    assert status["targetBalancedness"] == pytest.approx(replanned.target_balancedness)


def test_a_reshape_ends_the_plan() -> None:
    setup = Setup([one_move_serving()], [placement()])
    setup.pass_()
    setup.now += 30
    assert setup.pass_()[KEY].reason is Reason.REBALANCED
    body = setup.kube.get(K2Serving.KIND, "ns", "k2")
    assert body is not None
    version = body["metadata"]["resourceVersion"]
    setup.cluster.client("k2-tests").merge_patch(K2Serving.KIND, "ns", "k2", {"spec": {"ranksPerGroup": 2}}, version)
    setup.now += 30
    assert setup.pass_()[KEY].reason is Reason.RESHAPED
    status = setup.placement().status
    assert status is not None and status.rebalance_plan is None


# Per-group load ----------------------------------------------------------------------------------------------------


class GroupPages:
    """Two groups of RANKS ranks; group g's counters grow by `loads[g] / RANKS` per rank on every tick."""

    def __init__(self) -> None:
        self.totals = [np.zeros((LAYERS, EXPERTS)), np.zeros((LAYERS, EXPERTS))]
        self.time = 0.0

    def tick(self, loads: list[np.ndarray]) -> None:
        self.totals = [total + load / RANKS for total, load in zip(self.totals, loads, strict=True)]
        self.time += 60.0

    def fetch(self, url: str, timeout: float) -> str:
        group, rank = (int(part) for part in url.rsplit("/", 2)[-2:])
        lines = ["# TYPE k2_expert_tokens_total counter"]
        for (layer, expert), value in np.ndenumerate(self.totals[group]):
            labels = f'serving="k2",group="{group}",rank="{rank}",layer="{layer}",expert="{expert}"'
            lines.append(f"k2_expert_tokens_total{{{labels}}} {value}")
        return "\n".join(lines) + "\n"


def test_each_groups_load_is_read_and_the_placement_is_planned_on_their_sum() -> None:
    setup = Setup([serving() | {"spec": serving()["spec"] | {"groups": 2}}], [placement()])
    pages = GroupPages()
    setup.controller.endpoints = lambda s: [f"http://127.0.0.1:1/{g}/{r}" for g in range(2) for r in range(RANKS)]
    setup.controller.scrape_reader = ScrapeLoadReader(fetch=pages.fetch, clock=lambda: pages.time)
    first, second = np.full((LAYERS, EXPERTS), 100.0), np.full((LAYERS, EXPERTS), 100.0)
    first[:, 2], second[:, 5] = 3000.0, 1500.0

    def pass_() -> Decision:
        pages.tick([first, second])
        return setup.controller.run_once(force=True)[KEY]

    assert pass_().reason is Reason.TOO_FEW_SAMPLES
    decision = pass_()
    assert decision.reason is Reason.REBALANCED, decision.message
    start = convert.placement_array(ExpertPlacement.model_validate(placement()))
    eplb, spec = K2Serving.model_validate(serving()).spec.eplb, ExpertPlacement.model_validate(placement()).spec
    budget = eplb.move_budget(spec.total_slots)  # maxMovesFraction 0.1 of 2 layers x 12 slots: 3
    on_sum = plan_rounds(first + second, start, budget=budget, epsilon=0.01, min_gain=0.02, max_rounds=8)
    np.testing.assert_array_equal(decision.placement_LGS, on_sum.rounds[0].placement_LGS)
    assert decision.group_balancedness is not None and set(decision.group_balancedness) == {"0", "1"}
    assert "worst group" in decision.message


# Topology ----------------------------------------------------------------------------------------------------------


def rank_pod(group: int, rank: int, node: str | None, phase: str = "Running") -> Object:
    pod: Object = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"k2-g{group}-{rank}",
            "namespace": "ns",
            "labels": {"k2.ai/test-rank": "k2", Labels.GROUP: str(group), POD_INDEX_LABEL: str(rank)},
        },
        "spec": {"containers": [{"name": "rank", "image": "img"}]},
        "status": {"phase": phase},
    }
    if node is not None:
        pod["spec"]["nodeName"] = node
    return pod


def with_pods(pods: list[Object], groups: int = 1) -> tuple[Setup, K2Serving]:
    setup = Setup([serving() | {"spec": serving()["spec"] | {"groups": groups}}], [placement()])
    user = setup.cluster.client("k2-tests")
    user.apply_status(K2Serving.KIND, "ns", "k2", {"selector": "k2.ai/test-rank=k2"})
    for pod in pods:
        user.create(pod)
        user.apply_status("Pod", "ns", pod["metadata"]["name"], pod["status"])
    body = setup.kube.get(K2Serving.KIND, "ns", "k2")
    assert body is not None
    return setup, K2Serving.model_validate(body)


def test_ranks_per_node_comes_from_the_rank_pods_node_assignment() -> None:
    nodes = ["a", "a", "b", "b"]
    setup, the_serving = with_pods([rank_pod(0, r, nodes[r]) for r in range(RANKS)])
    assert setup.controller._gpus_per_node(the_serving, RANKS) == 2
    placed = api.rank_nodes(setup.kube, the_serving)
    assert sorted((p.group, p.rank, p.node) for p in placed) == [("0", r, nodes[r]) for r in range(RANKS)]


@pytest.mark.parametrize(
    "nodes",
    [
        ["a", "b", "a", "b"],  # ranks of one node not contiguous
        ["a", "a", "a", "b"],  # unequal blocks
        ["a", "a", "b", None],  # one rank not scheduled yet
    ],
)
def test_no_topology_unless_the_nodes_hold_equal_contiguous_blocks(nodes: list[str | None]) -> None:
    setup, the_serving = with_pods([rank_pod(0, r, nodes[r]) for r in range(RANKS)])
    assert setup.controller._gpus_per_node(the_serving, RANKS) is None


def test_topology_must_agree_across_groups() -> None:
    same = [rank_pod(g, r, f"n{g}{r // 2}") for g in range(2) for r in range(RANKS)]
    setup, the_serving = with_pods(same, groups=2)
    assert setup.controller._gpus_per_node(the_serving, RANKS) == 2
    mixed = [rank_pod(0, r, f"n0{r // 2}") for r in range(RANKS)] + [rank_pod(1, r, "n1") for r in range(RANKS)]
    setup, the_serving = with_pods(mixed, groups=2)
    assert setup.controller._gpus_per_node(the_serving, RANKS) is None


def test_an_ended_pod_does_not_count() -> None:
    pods = [rank_pod(0, r, ["a", "a", "b", "b"][r]) for r in range(RANKS)] + [rank_pod(0, 9, "z", phase="Failed")]
    setup, the_serving = with_pods(pods)
    assert sorted(p.rank for p in api.rank_nodes(setup.kube, the_serving)) == list(range(RANKS))
    assert setup.controller._gpus_per_node(the_serving, RANKS) == 2


def test_a_failed_pod_listing_plans_without_topology() -> None:
    setup, the_serving = with_pods([rank_pod(0, r, ["a", "a", "b", "b"][r]) for r in range(RANKS)])
    setup.cluster.fail("list", "Pod", Unavailable("503: etcd is away", 503))
    assert setup.controller._gpus_per_node(the_serving, RANKS) is None
    assert setup.controller._gpus_per_node(the_serving, RANKS) == 2  # the next pass lists again
