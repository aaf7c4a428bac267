"""The controller loop and its API conversions without a cluster: a fake KubeApi and fake scrape pages."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest
from kubernetes.client.exceptions import ApiException

from k2_api import ExpertPlacement, K2Serving, ModelSpec, round_robin
from k2_api.common import Condition, ConditionStatus
from k2_api.serving import Eplb
from k2_eplb import convert
from k2_eplb.controller import Controller
from k2_eplb.controller_metrics import ControllerMetrics
from k2_eplb.kube import REBALANCED_AT, parse_rfc3339, rfc3339
from k2_eplb.planner import Decision, Reason
from k2_eplb.scrape_reader import ScrapeLoadReader

LAYERS, EXPERTS, RANKS, SLOTS = 2, 8, 4, 3
# One Kimi-K2 expert in fp8: 3 x 7168 x 2048 one-byte weights + 3 x 16 x 56 fp32 block scales.
KIMI_K2_FP8_EXPERT_BYTES = 3 * 7168 * 2048 + 3 * 16 * 56 * 4
NOW = 1_800_000_000.0


def serving(name: str = "k2", enabled: bool = True) -> K2Serving:
    return K2Serving.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "model": {"preset": "kimi-k2", "dtype": "fp8"},
                "image": "img",
                "ranksPerGroup": RANKS,
                "eplb": {"enabled": enabled, "intervalSeconds": 30, "windowSeconds": 60, "cooldownSeconds": 120},
            },
        }
    )


def placement(name: str = "k2", generation: int = 1, applied: int | None = 1) -> ExpertPlacement:
    return ExpertPlacement.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "7", "generation": 4},
            "spec": {
                "numLayers": LAYERS,
                "numExperts": EXPERTS,
                "ranks": RANKS,
                "slotsPerRank": SLOTS,
                "generation": generation,
                "layers": [t.to_dict() for t in round_robin(LAYERS, EXPERTS, RANKS, SLOTS)],
            },
            "status": {"appliedGeneration": applied},
        }
    )


class FakeKube:
    """Records every write; placements are updated the way the API server would."""

    def __init__(self, servings: list[K2Serving], placements: list[ExpertPlacement]):
        self.servings = servings
        self.placements = {p.metadata.name: p for p in placements}
        self.writes: list[tuple[str, int]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.fail_get: set[str] = set()

    def list_servings(self, namespace: str | None) -> list[K2Serving]:
        return self.servings

    def get_placement(self, namespace: str, name: str) -> ExpertPlacement | None:
        if name in self.fail_get:
            raise ApiException(status=500, reason="boom")
        return self.placements.get(name)

    def write_placement(
        self, placement: ExpertPlacement, layers: list[dict[str, Any]], generation: int, reason: str, at: float
    ) -> None:
        body = placement.model_dump(mode="json", by_alias=True)
        body["spec"].update(layers=layers, generation=generation, reason=reason)
        body["metadata"]["annotations"] = {REBALANCED_AT: rfc3339(at)}
        assert placement.metadata.name is not None
        self.placements[placement.metadata.name] = ExpertPlacement.model_validate(body)
        self.writes.append((placement.metadata.name, generation))

    def apply_status(self, placement: ExpertPlacement, status: dict[str, Any]) -> None:
        assert placement.metadata.name is not None
        current = self.placements[placement.metadata.name]
        body = current.model_dump(mode="json", by_alias=True, exclude_none=True)
        body.setdefault("status", {}).update(status)
        self.placements[placement.metadata.name] = ExpertPlacement.model_validate(body)
        self.statuses.append(status)

    def post_event(self, placement: ExpertPlacement, event_type: str, reason: str, message: str, at: float) -> None:
        self.events.append((event_type, reason))

    def rank_endpoints(self, serving: K2Serving) -> list[str]:
        raise AssertionError("tests inject the endpoints")


def page(rank: int, load: np.ndarray) -> str:
    lines = ["# TYPE k2_expert_tokens_total counter"]
    for (layer, expert), value in np.ndenumerate(load):
        labels = f'serving="k2",group="0",rank="{rank}",layer="{layer}",expert="{expert}"'
        lines.append(f"k2_expert_tokens_total{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


class Pages:
    """Each rank's counters grow by `load / RANKS` on every `tick()`; `down` ranks refuse connections."""

    def __init__(self) -> None:
        self.totals = np.zeros((LAYERS, EXPERTS))
        self.down: set[int] = set()
        self.time = 0.0

    def tick(self, load: np.ndarray, seconds: float = 60.0) -> None:
        self.totals = self.totals + load / RANKS
        self.time += seconds

    def fetch(self, url: str, timeout: float) -> str:
        rank = int(url.rsplit("/", 1)[-1])
        if rank in self.down:
            raise OSError("connection refused")
        return page(rank, self.totals)


def skewed() -> np.ndarray:
    load = np.full((LAYERS, EXPERTS), 100.0)
    load[:, 2] = 3000.0
    return load


class Setup:
    def __init__(self, servings: list[K2Serving], placements: list[ExpertPlacement]):
        self.kube = FakeKube(servings, placements)
        self.pages = Pages()
        self.now = NOW
        self.controller = Controller(
            self.kube,
            metrics=ControllerMetrics(),
            endpoints=lambda s: [f"http://127.0.0.1:1/{r}" for r in range(RANKS)],
            clock=lambda: self.now,
            scrape_reader=ScrapeLoadReader(fetch=self.pages.fetch, clock=lambda: self.pages.time),
        )

    def pass_(self, load: np.ndarray | None = None, **kwargs: Any) -> dict[tuple[str, str], Decision]:
        self.pages.tick(skewed() if load is None else load)
        return self.controller.run_once(**kwargs)


def test_first_pass_has_too_few_samples_then_it_rebalances() -> None:
    setup = Setup([serving()], [placement()])
    assert setup.pass_()[("ns", "k2")].reason is Reason.TOO_FEW_SAMPLES
    setup.now += 30
    decision = setup.pass_()[("ns", "k2")]
    assert decision.reason is Reason.REBALANCED
    assert setup.kube.writes == [("k2", 2)]
    written = setup.kube.placements["k2"]
    assert written.spec.generation == 2
    assert parse_rfc3339(written.metadata.annotations[REBALANCED_AT]) == NOW + 30
    assert written.status is not None
    assert written.status.moved_bytes == decision.moved_experts * KIMI_K2_FP8_EXPERT_BYTES
    assert setup.kube.events == [("Normal", "Rebalanced")]
    # The budget is maxMovesFraction (default 0.1) of 12 slots, rounded up.
    assert 0 < decision.moved_experts <= 2


def test_interval_gates_passes_unless_forced() -> None:
    setup = Setup([serving()], [placement()])
    assert setup.pass_()
    assert setup.pass_() == {}  # same instant: not due
    setup.now += 29
    assert setup.pass_() == {}
    assert setup.pass_(force=True)
    setup.now += 30
    assert setup.pass_()


def test_disabled_servings_are_not_touched() -> None:
    setup = Setup([serving(enabled=False)], [placement()])
    assert setup.pass_() == {}
    assert setup.kube.statuses == [] and setup.kube.writes == []
    assert setup.controller.metrics.value("k2_eplb_skipped_total", serving="k2", namespace="ns", reason="Disabled") == 1


def test_status_is_written_only_when_it_changes() -> None:
    setup = Setup([serving()], [placement(generation=2, applied=1)])
    for _ in range(3):
        setup.now += 30
        assert setup.pass_()[("ns", "k2")].reason is Reason.APPLY_PENDING
    assert len(setup.kube.statuses) == 1
    assert setup.kube.writes == []


def test_a_warning_event_only_when_partial_metrics_start() -> None:
    setup = Setup([serving()], [placement()])
    setup.pages.down = {1}
    for _ in range(3):
        setup.now += 30
        assert setup.pass_()[("ns", "k2")].reason is Reason.PARTIAL_METRICS
    assert setup.kube.events == [("Warning", "PartialMetrics")]
    status = setup.kube.placements["k2"].status
    assert status is not None
    (planned,) = status.conditions
    assert (planned.status, planned.message) == ("False", "partial metrics: 3/4 ranks reporting")


def test_an_api_error_is_counted_and_other_servings_still_planned() -> None:
    setup = Setup([serving("bad"), serving("k2")], [placement("bad"), placement("k2")])
    setup.kube.fail_get = {"bad"}
    decisions = setup.pass_()
    assert list(decisions) == [("ns", "k2")]
    assert setup.controller.failures == 1
    assert setup.controller.metrics.value("k2_eplb_errors_total", serving="bad", namespace="ns") == 1


def test_a_serving_without_placement_is_skipped_quietly() -> None:
    setup = Setup([serving()], [])
    assert setup.pass_() == {}
    assert setup.controller.failures == 0


# Conversions -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"preset": "kimi-k2", "dtype": "fp8"}, KIMI_K2_FP8_EXPERT_BYTES),
        ({"preset": "deepseek-v3", "dtype": "bf16"}, 3 * 7168 * 2048 * 2),
        # The shipped example (examples/k2serving-debug.yaml): 3 x 64 x 32 fp32 weights, not Kimi-K2's 44 MB.
        ({"preset": "k2-debug", "dtype": "fp32"}, 24_576),
        ({"preset": "k2-debug", "dtype": "fp8"}, 3 * 64 * 32 + 3 * 4),  # one partial 128 x 128 block per matrix
        ({"config": {"num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 2}}, 2 * 44_040_192),
        (
            {
                "config": {
                    "num_hidden_layers": 3,
                    "n_routed_experts": 8,
                    "num_experts_per_tok": 2,
                    "hidden_size": 64,
                    "moe_intermediate_size": 32,
                },
                "dtype": "fp32",
            },
            3 * 64 * 32 * 4,
        ),
    ],
)
def test_bytes_per_expert_from_the_model(model: dict[str, Any], expected: int) -> None:
    assert convert.bytes_per_expert(ModelSpec.model_validate(model)) == expected


def test_policy_takes_the_smaller_move_budget() -> None:
    eplb = Eplb(max_moves_fraction=0.5, max_moves=3, window_seconds=90, cooldown_seconds=10, min_improvement=0.05)
    policy = convert.policy_from_spec(eplb, num_slots=12)
    assert (policy.max_moves, policy.window_seconds, policy.cooldown_seconds, policy.min_improvement) == (
        3,
        90,
        10,
        0.05,
    )
    assert convert.policy_from_spec(Eplb(max_moves_fraction=0.1), num_slots=12).max_moves == 2


def test_placement_round_trips_through_the_array_form() -> None:
    xp = placement()
    array = convert.placement_array(xp)
    assert array.shape == (LAYERS, RANKS, SLOTS)
    assert convert.layers_from_array(array) == [t.to_dict() for t in xp.spec.layers]


def test_planned_condition_keeps_its_transition_time_while_the_status_holds() -> None:
    earlier = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    previous = Condition(type="Planned", status=ConditionStatus.FALSE, reason="Cooldown", last_transition_time=earlier)
    skip = Decision(Reason.APPLY_PENDING, "pending")
    assert convert.planned_condition(skip, previous, NOW, 4).last_transition_time == earlier
    rebalance = Decision(Reason.REBALANCED, "moved")
    flipped = convert.planned_condition(rebalance, previous, NOW, 4)
    assert flipped.last_transition_time == dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    assert (flipped.status, flipped.observed_generation) == ("True", 4)


def test_status_fields_keep_the_last_prediction_on_a_skip() -> None:
    xp = placement()
    assert xp.status is not None
    xp.status.predicted_balancedness, xp.status.moved_experts, xp.status.moved_bytes = 0.9, 5, 500
    fields = convert.status_fields(Decision(Reason.COOLDOWN, "cooldown: 5s left"), xp, NOW)
    assert (fields["predictedBalancedness"], fields["movedExperts"], fields["movedBytes"]) == (0.9, 5, 500)
    assert fields["conditions"][0]["reason"] == "Cooldown"
