"""The loop survives what a real cluster does to it: API server outages, bad objects, conflicting human edits."""

from __future__ import annotations

import threading

import pytest

from k2_api import ExpertPlacement, K2Serving
from k2_api.kube import Unavailable
from k2_eplb import controller as controller_module
from k2_eplb.planner import Reason
from tests.eplb.test_controller_unit import Setup, placement, serving


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
