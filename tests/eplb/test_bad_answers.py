"""Malformed, NaN, infinite and negative answers from Prometheus and from rank pages: a clean LoadReadError naming
what was wrong, the pass ends as MetricsUnavailable, and the next pass runs."""

from __future__ import annotations

import functools
import json
import math
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_eplb.load import LoadReadError, LoadSample
from k2_eplb.planner import Reason
from k2_eplb.prometheus_reader import MAX_BODY_BYTES, PrometheusLoadReader, http_get
from k2_eplb.scrape_reader import ScrapeLoadReader
from tests.eplb.canned_http import CannedServer, canned_server
from tests.eplb.test_controller_unit import Setup, placement, serving

LABELS = {"serving": "k2"}
SHAPE = {"window_seconds": 60.0, "num_layers": 2, "num_experts": 8, "ranks_expected": 4}


def vector(*rows: Any) -> bytes:
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": list(rows)}}).encode()


def row(value: Any, **labels: Any) -> dict[str, Any]:
    return {"metric": {"layer": "0", "expert": "1", **labels}, "value": [1.8e9, value]}


BAD_PROMETHEUS = [
    (b"<html>502 Bad Gateway</html>", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"null", "not a JSON object"),
    (b'{"status": "success"}', "data"),
    (b'{"status": "error", "errorType": "bad_data", "error": "parse error"}', "bad_data: parse error"),
    (b'{"status": "success", "data": {"resultType": "matrix", "result": []}}', "expected a vector"),
    (b'{"status": "success", "data": {"resultType": "vector", "result": {}}}', "result"),
    (vector(7), "row 0"),
    (vector({"metric": {"layer": "0", "expert": "1"}}), "value"),
    (vector({"metric": {"layer": "0", "expert": "1"}, "value": "5"}), "value"),
    (vector({"metric": ["layer"], "value": [1, "5"]}), "metric"),
    (vector(row("NaN")), "NaN"),
    (vector(row("+Inf")), "inf"),
    (vector(row("-Inf")), "inf"),
    (vector(row("-3")), "-3"),
    (vector(row("many")), "many"),
    (vector(row(None)), "None"),
    (vector({"metric": {}, "value": [1, "5"]}), "layer"),
    (vector(row("5", layer="one")), "layer"),
    (vector(row("5", expert=3)), "expert"),
]


@pytest.fixture
def server() -> Iterator[CannedServer]:
    with canned_server() as canned:
        yield canned


@pytest.mark.parametrize(("body", "problem"), BAD_PROMETHEUS)
def test_a_bad_prometheus_answer_is_a_load_read_error_naming_the_problem(
    server: CannedServer, body: bytes, problem: str
) -> None:
    server.body = body
    with pytest.raises(LoadReadError, match="prometheus") as raised:
        PrometheusLoadReader(server.url, timeout=5).read(LABELS, **SHAPE)
    assert problem.lower() in str(raised.value).lower()


def test_an_infinite_sample_count_is_a_load_read_error(server: CannedServer) -> None:
    """Every query gets one well-labelled row of +Inf: the sample count must not turn into an OverflowError."""
    server.body = vector(row("+Inf", group="0", rank="0"))
    with pytest.raises(LoadReadError, match=r"(?i)inf"):
        PrometheusLoadReader(server.url, timeout=5).read(LABELS, **SHAPE)


def test_an_http_error_answer_is_a_load_read_error(server: CannedServer) -> None:
    server.status, server.body = 503, b"overloaded"
    with pytest.raises(LoadReadError, match="503"):
        PrometheusLoadReader(server.url, timeout=5).read(LABELS, **SHAPE)


@pytest.mark.parametrize(("body", "problem"), [*BAD_PROMETHEUS, (vector(row("+Inf", group="0", rank="0")), "inf")])
def test_the_pass_over_a_bad_prometheus_is_metrics_unavailable_and_the_next_pass_runs(
    server: CannedServer, body: bytes, problem: str
) -> None:
    setup = Setup([serving()], [placement()])
    setup.controller.prometheus_url = server.url
    server.body = body
    decision = setup.controller.run_once(force=True)[("ns", "k2")]
    assert decision.reason is Reason.METRICS_UNAVAILABLE
    assert problem.lower() in decision.message.lower()
    status = setup.placement().status
    assert status is not None
    (planned,) = [c for c in status.conditions if c.type == "Planned"]
    assert planned.reason == "MetricsUnavailable" and planned.message == decision.message
    server.body = vector()  # a sane, empty answer: nothing reports
    assert setup.controller.run_once(force=True)[("ns", "k2")].reason is Reason.PARTIAL_METRICS
    assert setup.controller.failures == 0


def page(value: str, labels: str = 'layer="0",expert="1"', name: str = "k2_expert_tokens_total") -> bytes:
    return f'# TYPE k2_expert_tokens counter\n{name}{{serving="k2",group="0",rank="0",{labels}}} {value}\n'.encode()


BAD_PAGES = [
    (b'k2_expert_tokens_total{serving="k2" 3\n', "parse"),
    (b"\xff\xfe not utf-8", "utf-8"),
    (page("NaN"), "nan"),
    (page("+Inf"), "inf"),
    (page("-4"), "-4"),
    (page("5", labels='expert="1"'), "layer"),
    (page("5", labels='layer="0",expert="x"'), "expert"),
    (page("NaN", labels='layer="0",slot="1"', name="k2_slot_tokens_total"), "nan"),
]


@pytest.mark.parametrize(("body", "problem"), BAD_PAGES)
def test_a_bad_rank_page_is_a_load_read_error_naming_the_endpoint(
    server: CannedServer, body: bytes, problem: str
) -> None:
    server.body = body
    url = f"{server.url}/metrics"
    with pytest.raises(LoadReadError, match=url) as raised:
        ScrapeLoadReader(timeout=5).read(LABELS, [url], **SHAPE)
    assert problem.lower() in str(raised.value).lower()


@pytest.mark.parametrize(("body", "problem"), BAD_PAGES)
def test_the_pass_over_a_bad_rank_page_is_metrics_unavailable_and_the_next_pass_runs(
    server: CannedServer, body: bytes, problem: str
) -> None:
    setup = Setup([serving()], [placement()])
    setup.controller.endpoints = lambda s: [f"{server.url}/metrics"]
    setup.controller.scrape_reader = ScrapeLoadReader(timeout=5)
    server.body = body
    decision = setup.controller.run_once(force=True)[("ns", "k2")]
    assert decision.reason is Reason.METRICS_UNAVAILABLE
    assert problem.lower() in decision.message.lower()
    server.body = page("5")
    assert setup.controller.run_once(force=True)[("ns", "k2")].reason is Reason.PARTIAL_METRICS


# Any answer at all: a LoadSample that makes sense, or a LoadReadError; never another exception. ----------------------

LABEL_NAMES = st.sampled_from(["layer", "expert", "group", "rank", "slot", "serving"])
LABEL_VALUES = st.one_of(st.sampled_from(["0", "1", "7", "8", "-1", "x", ""]), st.integers(-2, 9), st.none())
NUMBERS = st.one_of(
    st.sampled_from(["0", "1", "12.5", "-3", "NaN", "+Inf", "-Inf", "1e999", "abc", ""]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 10**20),
    st.none(),
)
ROWS = st.one_of(
    st.fixed_dictionaries(
        {"metric": st.dictionaries(LABEL_NAMES, LABEL_VALUES, max_size=4), "value": st.lists(NUMBERS, max_size=3)}
    ),
    st.fixed_dictionaries({"metric": st.dictionaries(LABEL_NAMES, LABEL_VALUES), "value": st.tuples(NUMBERS, NUMBERS)}),
)
PROMETHEUS_LIKE = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["success", "error", None]),
        "data": st.one_of(
            st.fixed_dictionaries(
                {"resultType": st.sampled_from(["vector", "scalar"]), "result": st.lists(ROWS, max_size=5)}
            ),
            st.none(),
        ),
    }
)
ANY_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=5)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


def assert_sane(sample: LoadSample) -> None:
    assert sample.load_LE.shape == (2, 8)
    assert np.isfinite(sample.load_LE).all() and (sample.load_LE >= 0).all()
    assert sample.ranks_seen >= 0 and sample.num_samples >= 0
    balancedness = sample.measured_balancedness
    assert balancedness is None or (math.isfinite(balancedness) and 0 <= balancedness <= 1)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(PROMETHEUS_LIKE, ANY_JSON), min_size=4, max_size=4))
def test_any_json_from_prometheus_is_a_sane_sample_or_a_load_read_error(answers: list[Any]) -> None:
    bodies = iter(answers)
    reader = PrometheusLoadReader("http://127.0.0.1:1", fetch=lambda url, timeout: json.dumps(next(bodies)).encode())
    try:
        sample = reader.read(LABELS, **SHAPE)
    except LoadReadError:
        return
    assert_sane(sample)


def sample_line(name: str, labels: dict[str, str], value: str) -> str:
    pairs = ",".join(f'{key}="{text}"' for key, text in labels.items())
    return f"{name}{{{pairs}}} {value}"


PAGE_LINES = st.builds(
    sample_line,
    st.sampled_from(["k2_expert_tokens_total", "k2_slot_tokens_total", "other_total"]),
    st.dictionaries(LABEL_NAMES, st.sampled_from(["0", "1", "7", "8", "k2", "x", ""]), max_size=5),
    st.sampled_from(["0", "1", "12.5", "-3", "NaN", "+Inf", "-Inf", "1e999", "abc"]),
)


PAGES = st.one_of(st.text(max_size=40), st.lists(PAGE_LINES, max_size=6).map("\n".join))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PAGES, min_size=2, max_size=2))
def test_any_rank_page_is_a_sane_sample_or_a_load_read_error(pages: list[str]) -> None:
    texts = iter(pages)
    reader = ScrapeLoadReader(fetch=lambda url, timeout: next(texts), clock=iter([0.0, 60.0]).__next__)
    try:
        reader.read(LABELS, ["http://127.0.0.1:1/metrics"], **SHAPE)
        sample = reader.read(LABELS, ["http://127.0.0.1:1/metrics"], **SHAPE)
    except LoadReadError:
        return
    assert_sane(sample)


class RawServer:
    """Answers every connection on 127.0.0.1 with `reply` verbatim and closes it (not HTTP, or cut short)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client:
                client.recv(65536)
                client.sendall(self.reply)


NOT_HTTP = [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "SSH-2.0"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "IncompleteRead"),
]


@pytest.mark.parametrize(("reply", "problem"), NOT_HTTP)
def test_a_prometheus_url_that_does_not_speak_http_is_a_load_read_error(reply: bytes, problem: str) -> None:
    server = RawServer(reply)
    try:
        with pytest.raises(LoadReadError, match=problem):
            PrometheusLoadReader(server.url, timeout=5).read(LABELS, **SHAPE)
    finally:
        server.sock.close()


@pytest.mark.parametrize(("reply", "problem"), NOT_HTTP)
def test_a_rank_that_does_not_speak_http_counts_as_not_reporting(reply: bytes, problem: str) -> None:
    server = RawServer(reply)
    try:
        sample = ScrapeLoadReader(timeout=5).read(LABELS, [f"{server.url}/metrics"], **SHAPE)
    finally:
        server.sock.close()
    assert sample.ranks_seen == 0
    (note,) = sample.notes
    assert problem in note


def test_an_answer_over_the_size_limit_is_refused_unread(server: CannedServer) -> None:
    server.body = vector(*[row("1")] * 2000)
    limited = functools.partial(http_get, max_bytes=10_000)
    with pytest.raises(LoadReadError, match="larger than 10000 bytes"):
        PrometheusLoadReader(server.url, timeout=5, fetch=limited).read(LABELS, **SHAPE)
    url = f"{server.url}/metrics"
    server.body = page("5") * 500
    with pytest.raises(LoadReadError, match=f"{url}: .*larger than 10000 bytes"):
        ScrapeLoadReader(timeout=5, fetch=lambda u, t: http_get(u, t, max_bytes=10_000).decode()).read(
            LABELS, [url], **SHAPE
        )
    assert MAX_BODY_BYTES >= 64 * 2**20  # a rank page of 60 layers x 384 experts is about 5 MB


def test_a_chunked_answer_is_read_only_up_to_the_size_limit() -> None:
    body = b"x" * 20_000
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    server = RawServer(chunked)
    try:
        with pytest.raises(ValueError, match="larger than 10000 bytes"):
            http_get(server.url, 5, max_bytes=10_000)
        assert http_get(server.url, 5, max_bytes=20_000) == body
    finally:
        server.sock.close()
