"""The loop survives what a real cluster does to it: API server outages, bad objects, conflicting human edits."""

from __future__ import annotations

import threading

import pytest

from k2_api import ExpertPlacement, K2Serving, round_robin
from k2_api.kube import Kube, Unavailable
from k2_eplb import controller as controller_module
from k2_eplb import kube as api
from k2_eplb.planner import Reason
from tests.eplb.test_controller_unit import EXPERTS, LAYERS, RANKS, SLOTS, Setup, placement, serving


class StopAfter(threading.Event):
    """A stop event whose `wait` counts the loop's sleeps and stops the loop after `passes` of them."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.passes = passes
        self.sleeps: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.sleeps.append(timeout)
        if len(self.sleeps) >= self.passes:
            self.set()
        return self.is_set()


def test_an_api_server_outage_is_logged_counted_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    setup = Setup([serving()], [placement()])
    refused = Unavailable("GET /apis/k2.ai/v1alpha1/k2servings: connection refused")
    setup.cluster.fail("list", K2Serving.KIND, refused, times=3)
    stop = StopAfter(passes=4)
    setup.controller.run_forever(None, interval=10.0, stop=stop)
    assert stop.sleeps == [10.0] * 4  # it slept after each pass, the failed ones included
    assert setup.controller.metrics.value("k2_eplb_pass_errors_total") == 3
    assert setup.controller.failures == 3
    assert sum("connection refused" in r.getMessage() for r in caplog.records if r.levelname == "ERROR") == 3
    status = setup.placement().status  # the fourth pass planned the serving
    assert status is not None and [c.reason for c in status.conditions] == ["TooFewSamples"]


def test_a_failed_listing_counts_as_a_failed_once_pass() -> None:
    setup = Setup([serving()], [placement()])
    setup.cluster.fail("list", K2Serving.KIND, Unavailable("503: etcd is away", 503))
    assert setup.controller.run_once(force=True) == {}
    assert setup.controller.failures == 1
    assert setup.controller.run_once(force=True)[("ns", "k2")].reason is Reason.TOO_FEW_SAMPLES


def test_an_outage_while_writing_status_is_counted_and_the_next_pass_writes_it() -> None:
    setup = Setup([serving()], [placement()])
    setup.cluster.fail("apply_status", ExpertPlacement.KIND, Unavailable("503: etcd is away", 503))
    assert setup.pass_() == {}
    assert setup.controller.metrics.value("k2_eplb_errors_total", serving="k2", namespace="ns") == 1
    setup.now += 30
    assert setup.pass_()[("ns", "k2")].reason is Reason.REBALANCED


def test_a_serving_that_does_not_validate_is_counted_and_the_others_are_planned() -> None:
    bad = serving("bad")
    bad["spec"]["ranksPerGroup"] = "four"
    setup = Setup([bad, serving("k2")], [placement("bad"), placement("k2")])
    decisions = setup.pass_()
    assert list(decisions) == [("ns", "k2")]
    assert setup.controller.metrics.value("k2_eplb_errors_total", serving="bad", namespace="ns") == 1


def test_an_unexpected_error_in_one_pass_is_logged_counted_and_the_next_pass_runs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup([serving()], [placement()])
    with monkeypatch.context() as patch:
        patch.setattr(controller_module, "plan", lambda *args, **kwargs: 1 / 0)
        assert setup.pass_() == {}
    assert setup.controller.metrics.value("k2_eplb_errors_total", serving="k2", namespace="ns") == 1
    assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)
    setup.now += 30
    assert setup.pass_()[("ns", "k2")].reason is Reason.REBALANCED


# Conflicting and invalid human edits of an ExpertPlacement ---------------------------------------------------------


def human_layers(shift: int) -> list[dict[str, object]]:
    """A valid placement (round robin shifted by `shift` experts), as a human would write it."""
    return [
        {"layer": t.layer, "slots": [[(e + shift) % EXPERTS for e in row] for row in t.slots]}
        for t in round_robin(LAYERS, EXPERTS, RANKS, SLOTS)
    ]


def edit_after_read(monkeypatch: pytest.MonkeyPatch, setup: Setup, spec: dict[str, object]) -> None:
    """The next time the controller reads the placement, a human merge-patches `spec` before the controller writes."""
    human = setup.cluster.client("kubectl-edit")
    read = api.get_placement

    def read_then_edit(kube: Kube, namespace: str, name: str) -> ExpertPlacement | None:
        observed = read(kube, namespace, name)
        monkeypatch.setattr(api, "get_placement", read)
        assert observed is not None and observed.metadata.resource_version
        human.merge_patch(ExpertPlacement.KIND, namespace, name, {"spec": spec}, observed.metadata.resource_version)
        return observed

    monkeypatch.setattr(api, "get_placement", read_then_edit)


def test_a_human_edit_between_read_and_write_is_never_overwritten_and_is_re_read_next_pass(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup([serving()], [placement()])
    assert setup.pass_()[("ns", "k2")].reason is Reason.TOO_FEW_SAMPLES
    setup.now += 30
    edit_after_read(monkeypatch, setup, {"generation": 5, "layers": human_layers(3), "reason": "by hand"})
    assert setup.pass_() == {}  # the rebalance it planned met a Conflict
    spec = setup.placement().spec
    assert (spec.generation, spec.reason) == (5, "by hand")
    assert [t.to_dict() for t in spec.layers] == human_layers(3)
    assert setup.controller.failures == 1
    assert any("Conflict" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    # The next loop pass (the serving's own interval has not elapsed) reads the human's generation 5 and waits for it.
    decision = setup.pass_()[("ns", "k2")]
    assert (decision.reason, decision.message) == (
        Reason.APPLY_PENDING,
        "previous generation 5 not yet applied (applied: 1)",
    )
    assert setup.spec_writes() == ["k2"]  # the one attempt that met the Conflict
    assert setup.placement().spec.generation == 5


def missing_expert_layers() -> list[dict[str, object]]:
    """Expert 7 has no replica in layer 1: the CRD's CEL rules allow it, the ranks cannot serve it."""
    layers = [t.to_dict() for t in round_robin(LAYERS, EXPERTS, RANKS, SLOTS)]
    layers[1]["slots"] = [[0 if e == 7 else e for e in row] for row in layers[1]["slots"]]
    return layers


def test_a_human_written_invalid_generation_is_reported_not_awaited_and_never_overwritten() -> None:
    invalid = placement(generation=2, applied=1)
    invalid["spec"]["layers"] = missing_expert_layers()
    setup = Setup([serving()], [invalid])
    for _ in range(3):
        decision = setup.pass_()[("ns", "k2")]
        assert decision.reason is Reason.INVALID_PLACEMENT
        assert "generation 2" in decision.message and "experts without a replica: 7" in decision.message
        setup.now += 30
    assert setup.spec_writes() == []
    status = setup.placement().status
    assert status is not None
    (planned,) = [c for c in status.conditions if c.type == "Planned"]
    assert (planned.status, planned.reason) == ("False", "InvalidPlacement")
    assert setup.events() == [("Warning", "InvalidPlacement")]
    # Fixed by hand as generation 3, and applied: the controller plans from it again.
    human = setup.cluster.client("kubectl-edit")
    fixed = {"spec": {"generation": 3, "layers": human_layers(1)}}
    human.merge_patch(ExpertPlacement.KIND, "ns", "k2", fixed, setup.placement().metadata.resource_version or "")
    human.apply_status(ExpertPlacement.KIND, "ns", "k2", {"appliedGeneration": 3})
    assert setup.pass_()[("ns", "k2")].reason is Reason.TOO_FEW_SAMPLES  # the first load read since
    setup.now += 30
    assert setup.pass_()[("ns", "k2")].reason is Reason.REBALANCED
    assert setup.placement().spec.generation == 4


def test_a_placement_with_two_replicas_on_one_gpu_is_reported_every_pass() -> None:
    doubled = placement()
    doubled["spec"]["layers"][0]["slots"][0] = [0, 0, 1]
    setup = Setup([serving()], [doubled])
    for _ in range(2):
        decision = setup.pass_()[("ns", "k2")]
        assert decision.reason is Reason.INVALID_PLACEMENT and "two replicas" in decision.message
        setup.now += 30
    assert setup.spec_writes() == []
