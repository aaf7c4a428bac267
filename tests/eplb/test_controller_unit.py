"""The controller loop and its API conversions without a cluster: the adapter's fake API server, fake scrape pages."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pytest

from k2_api import API_VERSION, ExpertPlacement, K2Serving, ModelSpec, round_robin
from k2_api.common import Condition, ConditionStatus
from k2_api.contract import Annotations
from k2_api.kube import Conflict, Object, Unavailable
from k2_api.kube.fake import FakeCluster
from k2_api.serving import Eplb
from k2_eplb import convert
from k2_eplb.controller import Controller
from k2_eplb.controller_metrics import ControllerMetrics
from k2_eplb.kube import FIELD_MANAGER, parse_rfc3339
from k2_eplb.planner import Decision, Reason
from k2_eplb.scrape_reader import ScrapeLoadReader
from tests.eplb.helpers import assert_valid_placement, field_managers

LAYERS, EXPERTS, RANKS, SLOTS = 2, 8, 4, 3
# One Kimi-K2 expert in fp8: 3 x 7168 x 2048 one-byte weights + 3 x 16 x 56 fp32 block scales.
KIMI_K2_FP8_EXPERT_BYTES = 3 * 7168 * 2048 + 3 * 16 * 56 * 4
NOW = 1_800_000_000.0
# Kimi-K2's expert size (the inline config's defaults) with LAYERS MoE layers of EXPERTS experts.
MODEL = {
    "config": {"num_hidden_layers": LAYERS + 1, "first_k_dense_replace": 1, "n_routed_experts": EXPERTS},
    "dtype": "fp8",
}


def serving(name: str = "k2", enabled: bool = True, ranks: int = RANKS) -> Object:
    return {
        "apiVersion": API_VERSION,
        "kind": K2Serving.KIND,
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "model": {**MODEL, "config": {**MODEL["config"], "num_experts_per_tok": 2}},
            "image": "img",
            "ranksPerGroup": ranks,
            "eplb": {"enabled": enabled, "intervalSeconds": 30, "windowSeconds": 60, "cooldownSeconds": 120},
        },
    }


def placement(name: str = "k2", generation: int = 1, applied: int | None = 1) -> Object:
    return {
        "apiVersion": API_VERSION,
        "kind": ExpertPlacement.KIND,
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
    """A fake API server holding the servings and placements (status as the operator reports it), and a controller."""

    def __init__(self, servings: list[Object], placements: list[Object]):
        self.cluster = FakeCluster()
        user = self.cluster.client("k2-tests")
        for obj in servings + placements:
            # As the operator does: a placement is created under the controller's field manager.
            user.create(obj, field_manager=FIELD_MANAGER if obj["kind"] == ExpertPlacement.KIND else None)
            if "status" in obj:
                user.apply_status(obj["kind"], "ns", obj["metadata"]["name"], obj["status"])
        self.kube = self.cluster.client(FIELD_MANAGER)
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

    def placement(self, name: str = "k2") -> ExpertPlacement:
        body = self.kube.get(ExpertPlacement.KIND, "ns", name)
        assert body is not None
        return ExpertPlacement.model_validate(body)

    def spec_writes(self) -> list[str]:
        """Names of the placements the controller wrote spec to."""
        return [c.name for c in self.cluster.writes("apply", ExpertPlacement.KIND) if c.manager == FIELD_MANAGER]

    def status_writes(self) -> int:
        return len([c for c in self.cluster.writes("apply_status") if c.manager == FIELD_MANAGER])

    def events(self) -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.kube.list("Event", "ns")]


def test_first_pass_has_too_few_samples_then_it_rebalances() -> None:
    setup = Setup([serving()], [placement()])
    assert setup.pass_()[("ns", "k2")].reason is Reason.TOO_FEW_SAMPLES
    setup.now += 30
    decision = setup.pass_()[("ns", "k2")]
    assert decision.reason is Reason.REBALANCED
    assert setup.spec_writes() == ["k2"]
    written = setup.placement()
    assert written.spec.generation == 2
    assert parse_rfc3339(written.metadata.annotations[Annotations.REBALANCED_AT]) == NOW + 30
    assert written.status is not None
    assert written.status.moved_bytes == decision.moved_experts * KIMI_K2_FP8_EXPERT_BYTES
    assert setup.events() == [("Normal", "Rebalanced")]
    # The budget is maxMovesFraction (default 0.1) of the group's 2 layers x 12 slots, rounded up.
    assert 0 < decision.moved_experts <= 3


def test_the_move_budget_counts_the_slots_of_every_moe_layer() -> None:
    body = serving()
    body["spec"]["eplb"]["maxMovesFraction"] = 0.08  # of 2 layers x 12 slots: 2 copies (of one layer's: 1)
    setup = Setup([body], [placement()])
    setup.pass_()
    setup.now += 30
    decision = setup.pass_()[("ns", "k2")]
    assert decision.reason is Reason.REBALANCED and decision.moved_experts == 2
    assert setup.placement().spec.total_slots == LAYERS * RANKS * SLOTS


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
    assert setup.status_writes() == 0 and setup.spec_writes() == []
    assert setup.controller.metrics.value("k2_eplb_skipped_total", serving="k2", namespace="ns", reason="Disabled") == 1


def test_status_is_written_only_when_it_changes() -> None:
    setup = Setup([serving()], [placement(generation=2, applied=1)])
    for _ in range(3):
        setup.now += 30
        assert setup.pass_()[("ns", "k2")].reason is Reason.APPLY_PENDING
    assert setup.status_writes() == 1
    assert setup.spec_writes() == []


def test_a_warning_event_only_when_partial_metrics_start() -> None:
    setup = Setup([serving()], [placement()])
    setup.pages.down = {1}
    for _ in range(3):
        setup.now += 30
        assert setup.pass_()[("ns", "k2")].reason is Reason.PARTIAL_METRICS
    assert setup.events() == [("Warning", "PartialMetrics")]
    status = setup.placement().status
    assert status is not None
    (planned,) = status.conditions
    assert (planned.status, planned.message) == ("False", "partial metrics: 3/4 ranks reporting")


def test_an_api_error_is_counted_and_other_servings_still_planned() -> None:
    setup = Setup([serving("bad"), serving("k2")], [placement("bad"), placement("k2")])
    setup.cluster.fail("get", ExpertPlacement.KIND, Unavailable("503: etcd is away", 503))  # the first: "bad"
    decisions = setup.pass_()
    assert list(decisions) == [("ns", "k2")]
    assert setup.controller.failures == 1
    assert setup.controller.metrics.value("k2_eplb_errors_total", serving="bad", namespace="ns") == 1


def test_a_serving_without_placement_is_skipped_quietly() -> None:
    setup = Setup([serving()], [])
    assert setup.pass_() == {}
    assert setup.controller.failures == 0


def test_a_placement_that_no_longer_fits_is_reshaped_past_every_gate() -> None:
    """Generation 2 is still applying, and EPLB is disabled: the new shape is written all the same."""
    setup = Setup([serving(enabled=False, ranks=2)], [placement(generation=2, applied=1)])
    decision = setup.pass_()[("ns", "k2")]
    assert decision.reason is Reason.RESHAPED
    written = setup.placement()
    spec = written.spec
    assert (spec.num_layers, spec.num_experts, spec.ranks, spec.slots_per_rank) == (LAYERS, EXPERTS, 2, 5)
    assert spec.generation == 3 and spec.reason is not None and spec.reason.startswith("reshape: generation 3")
    assert_valid_placement(convert.placement_array(written), LAYERS, EXPERTS, (2, 5))
    assert written.status is not None
    (planned,) = [c for c in written.status.conditions if c.type == convert.PLANNED]
    assert (planned.status, planned.reason) == ("True", "Reshaped")
    assert setup.events() == [("Normal", "Reshaped")]
    # Created on the controller's behalf and rewritten whole by it: one manager owns spec.
    body = setup.kube.get(ExpertPlacement.KIND, "ns", "k2")
    assert body is not None and field_managers(body) == {FIELD_MANAGER}
    # Once it fits, a disabled serving is left alone again.
    setup.now += 30
    assert setup.pass_() == {}
    assert setup.spec_writes() == ["k2"]


def test_a_rebalance_leaves_one_manager_on_spec() -> None:
    setup = Setup([serving()], [placement()])
    setup.pass_()
    setup.now += 30
    assert setup.pass_()[("ns", "k2")].reason is Reason.REBALANCED
    body = setup.kube.get(ExpertPlacement.KIND, "ns", "k2")
    assert body is not None and field_managers(body) == {FIELD_MANAGER}
    assert field_managers(body, "status") == {"k2-tests", FIELD_MANAGER}  # appliedGeneration stays the reporter's


def test_a_concurrent_change_fails_the_write_and_is_counted() -> None:
    setup = Setup([serving(ranks=2)], [placement()])
    setup.cluster.fail("apply", ExpertPlacement.KIND, Conflict("409: the object has been modified", 409))
    assert setup.pass_() == {}
    assert setup.controller.failures == 1
    assert setup.placement().spec.generation == 1
    setup.now += 30  # the next due pass succeeds
    assert setup.pass_()[("ns", "k2")].reason is Reason.RESHAPED


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
    xp = ExpertPlacement.model_validate(placement())
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
    xp = ExpertPlacement.model_validate(placement())
    assert xp.status is not None
    xp.status.predicted_balancedness, xp.status.moved_experts, xp.status.moved_bytes = 0.9, 5, 500
    fields = convert.status_fields(Decision(Reason.COOLDOWN, "cooldown: 5s left"), xp, NOW)
    assert (fields["predictedBalancedness"], fields["movedExperts"], fields["movedBytes"]) == (0.9, 5, 500)
    assert fields["conditions"][0]["reason"] == "Cooldown"
