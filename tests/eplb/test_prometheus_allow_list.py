"""A per-serving prometheusUrl cannot make the controller call arbitrary hosts: only allowed URLs are read, and no
reader follows a redirect."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from k2_eplb.controller import parse_args
from k2_eplb.load import LoadReadError
from k2_eplb.planner import Reason
from k2_eplb.prometheus_reader import PrometheusLoadReader, url_allowed
from k2_eplb.scrape_reader import ScrapeLoadReader
from tests.eplb.canned_http import CannedServer, canned_server
from tests.eplb.test_bad_answers import vector
from tests.eplb.test_controller_unit import Setup, placement, serving


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://prometheus.monitoring:9090", True),
        ("http://prometheus.monitoring:9090/", True),
        ("HTTP://Prometheus.Monitoring:9090", True),
        ("http://thanos.monitoring:10902/tenant-a", True),
        ("http://thanos.monitoring:10902/tenant-a/sub", True),
        ("http://thanos.monitoring:10902/tenant-ab", False),  # a prefix ends at a path segment
        ("http://thanos.monitoring:10902/", False),
        ("http://prometheus.monitoring:9091", False),
        ("http://prometheus.monitoring", False),  # port 80, not 9090
        ("https://prometheus.monitoring:9090", False),
        ("http://prometheus.monitoring:9090@169.254.169.254/", False),
        ("http://user:pw@prometheus.monitoring:9090", False),
        ("http://prometheus.monitoring:9090?x=1", False),
        ("http://prometheus.monitoring:9090#x", False),
        ("http://prometheus.monitoring:notaport", False),
        ("http://169.254.169.254/latest/meta-data", False),
        ("file:///etc/passwd", False),
    ],
)
def test_url_allowed(url: str, allowed: bool) -> None:
    prefixes = ["http://prometheus.monitoring:9090", "http://thanos.monitoring:10902/tenant-a/"]
    assert url_allowed(url, prefixes) is allowed


def test_nothing_is_allowed_by_an_empty_list() -> None:
    assert not url_allowed("http://prometheus.monitoring:9090", [])


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1: a connection attempt would wait in its backlog for `accept`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def assert_never_connected(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()


def test_a_serving_url_not_allowed_is_refused_without_a_connection(listener: socket.socket) -> None:
    host, port = listener.getsockname()
    target = serving()
    target["spec"]["eplb"]["prometheusUrl"] = f"http://{host}:{port}"
    setup = Setup([target], [placement()])
    setup.controller.prometheus_url = "http://prometheus.monitoring:9090"
    decision = setup.controller.run_once(force=True)[("ns", "k2")]
    assert decision.reason is Reason.METRICS_UNAVAILABLE
    assert decision.message == (
        f"metrics unavailable: spec.eplb.prometheusUrl 'http://{host}:{port}' is not allowed "
        "(allowed: http://prometheus.monitoring:9090; see --allowed-prometheus-url)"
    )
    assert_never_connected(listener)


def test_an_allowed_serving_url_is_read() -> None:
    with canned_server() as server:
        server.body = vector()
        target = serving()
        target["spec"]["eplb"]["prometheusUrl"] = f"{server.url}/"
        setup = Setup([target], [placement()])
        setup.controller.allowed_prometheus_urls = (server.url,)
        assert setup.controller.run_once(force=True)[("ns", "k2")].reason is Reason.PARTIAL_METRICS
        assert server.requests == 4


def test_the_controllers_own_prometheus_is_always_allowed() -> None:
    with canned_server() as server:
        server.body = vector()
        target = serving()
        target["spec"]["eplb"]["prometheusUrl"] = server.url
        setup = Setup([target], [placement()])
        setup.controller.prometheus_url = server.url
        assert setup.controller.run_once(force=True)[("ns", "k2")].reason is Reason.PARTIAL_METRICS


@pytest.fixture
def redirecting(listener: socket.socket) -> Iterator[CannedServer]:
    host, port = listener.getsockname()
    with canned_server() as server:
        server.status, server.headers = 302, {"Location": f"http://{host}:{port}/api/v1/query"}
        yield server


def test_prometheus_redirects_are_not_followed(redirecting: CannedServer, listener: socket.socket) -> None:
    with pytest.raises(LoadReadError, match="302"):
        PrometheusLoadReader(redirecting.url, timeout=5).read(
            {"serving": "k2"}, window_seconds=60, num_layers=2, num_experts=8, ranks_expected=4
        )
    assert redirecting.requests == 1
    assert_never_connected(listener)


def test_rank_page_redirects_are_not_followed(redirecting: CannedServer, listener: socket.socket) -> None:
    sample = ScrapeLoadReader(timeout=5).read(
        {"serving": "k2"},
        [f"{redirecting.url}/metrics"],
        window_seconds=60,
        num_layers=2,
        num_experts=8,
        ranks_expected=1,
    )
    assert sample.ranks_seen == 0 and "302" in sample.notes[0]
    assert_never_connected(listener)


def test_the_allow_list_flag_repeats() -> None:
    args = parse_args(["--allowed-prometheus-url", "http://a:9090", "--allowed-prometheus-url", "http://b:9090/x"])
    assert args.allowed_prometheus_url == ["http://a:9090", "http://b:9090/x"]
    assert parse_args([]).allowed_prometheus_url == []
