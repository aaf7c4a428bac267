"""/healthz fails when the loop is stuck: no pass completed within --healthz-intervals intervals."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from k2_eplb import kube as api
from k2_eplb.controller import parse_args
from k2_eplb.controller_metrics import ControllerMetrics, Liveness, serve
from tests.eplb.test_controller_unit import Setup, placement, serving
from tests.support.waits import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_when_no_pass_completed_within_the_limit() -> None:
    clock = Clock()
    liveness = Liveness(max_age_s=100.0, clock=clock)
    assert liveness.problem() is None  # starting counts as a pass
    clock.now += 100.0
    assert liveness.problem() is None
    clock.now += 1.0
    assert liveness.problem() == "no pass completed for 101s (limit 100s): the loop is stuck"
    liveness.beat()
    assert liveness.problem() is None


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def endpoint(clock: Clock) -> Iterator[tuple[str, Liveness, ControllerMetrics]]:
    metrics, liveness = ControllerMetrics(), Liveness(max_age_s=50.0, clock=clock)
    server = serve(metrics, liveness, port=0, address="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", liveness, metrics
    finally:
        server.shutdown()
        server.server_close()


def test_healthz_and_metrics_over_http(endpoint: tuple[str, Liveness, ControllerMetrics], clock: Clock) -> None:
    url, liveness, metrics = endpoint
    metrics.pass_errors.inc()
    assert get(f"{url}/healthz") == (200, "ok\n")
    status, text = get(f"{url}/metrics")
    assert status == 200 and "k2_eplb_pass_errors_total 1.0" in text
    clock.now += 51
    assert get(f"{url}/healthz") == (503, "no pass completed for 51s (limit 50s): the loop is stuck\n")
    assert get(f"{url}/metrics")[0] == 200  # still scrapeable while stuck
    assert get(f"{url}/nothing")[0] == 404
    liveness.beat()
    assert get(f"{url}/healthz")[0] == 200


def test_a_stuck_pass_fails_healthz_and_a_completed_one_heals_it(
    monkeypatch: pytest.MonkeyPatch, endpoint: tuple[str, Liveness, ControllerMetrics], clock: Clock
) -> None:
    url, liveness, _ = endpoint
    setup = Setup([serving()], [placement()])
    setup.controller.liveness = liveness
    entered, release = threading.Event(), threading.Event()
    listing = api.list_serving_objects

    def stuck_listing(*args: Any) -> Any:  # the first pass hangs in its listing until released
        if entered.is_set():
            return listing(*args)
        entered.set()
        assert release.wait(timeout=30)
        return listing(*args)

    monkeypatch.setattr(api, "list_serving_objects", stuck_listing)
    stop = threading.Event()
    loop = threading.Thread(target=setup.controller.run_forever, args=(None, 10.0, stop), daemon=True)
    loop.start()
    try:
        wait_for("the pass to hang", entered.is_set, 10)
        clock.now += 51  # five intervals of 10 s and no pass completed
        assert get(f"{url}/healthz")[0] == 503
        release.set()
        wait_for("the pass to complete", lambda: get(f"{url}/healthz")[0] == 200, 10)
    finally:
        stop.set()
        release.set()
        loop.join(timeout=10)
    assert not loop.is_alive()


def test_the_healthz_limit_is_intervals_times_the_interval() -> None:
    args = parse_args(["--interval", "4", "--healthz-intervals", "5"])
    assert args.interval * args.healthz_intervals == 20
    assert parse_args([]).healthz_intervals == 10
    with pytest.raises(SystemExit):
        parse_args(["--healthz-intervals", "0"])
