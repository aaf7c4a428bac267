"""The HTTP API fuzzed at the wire: hypothesis-made requests over raw sockets to the real server stack (uvicorn, our
h11 protocol, the ASGI app) serving the real OpenAI and rank routes over a real one-rank engine.

Random JSON, wrong types for the known fields, huge numbers, deep nesting, invalid UTF-8, malformed, negative,
oversized and lying Content-Lengths (a truncated body, then the client closes or stays silent past the server's
short deadline), chunked bodies and garbage request lines and headers. Every answer is a 4xx, or a 200 where the
request is valid (the parsers are the oracle for JSON bodies); never a 5xx, never a hang (a client timeout fails
the test). The server stays up: after every example the same greedy completion gives the same text as before the
fuzz, and afterwards its threads and memory are bounded. `-s` prints the figures."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_workers.serve.endpoints import HttpServer, serve_routes
from k2_workers.serve.http_routes import CHAT_PATH, COMPLETIONS_PATH, GENERATE_PATH, HttpLimits
from k2_workers.serve.openai_request import parse_chat, parse_completions
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.rank_routes import rank_routes
from k2_workers.serve.request import parse_generate
from tests.serve.test_stream import one_rank_engine
from tests.support.waits import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # deep bodies: long reprs

MODEL = "k2-fuzz"
MAX_NEW_TOKENS = 4  # the routes' limit: a valid fuzzed request decodes little
TIMEOUT_S = 0.3  # the server's header and body deadline: a stalled client costs this much
LIMITS = HttpLimits(max_body_bytes=64 << 10, socket_timeout_s=TIMEOUT_S, max_connections=64, max_requests=16)
CLIENT_TIMEOUT_S = 30.0  # no answer and no close within this: the server hangs
GOOD = {"model": MODEL, "prompt": "The expert placement", "max_tokens": 2, "temperature": 0}
THREAD_SLACK = LIMITS.max_requests + 4  # the worker pool may have grown to its bound; a few transient threads
RSS_SLACK_KIB = 256 << 10
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARSERS: dict[str, Callable[[bytes, int], object]] = {
    COMPLETIONS_PATH: parse_completions,
    CHAT_PATH: parse_chat,
    GENERATE_PATH: parse_generate,
}
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
EVERY_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")  # pipelined answers; no body line starts so


@dataclass
class Fuzzed:
    server: HttpServer
    good_text: str  # the good request's completion before the fuzz
    threads_before: int
    rss_before_kib: int
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def port(self) -> int:
        return self.server.server_port


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    engine, _ = one_rank_engine()
    routes = rank_routes(engine, MAX_NEW_TOKENS) | openai_routes(engine, MAX_NEW_TOKENS, MODEL, None)
    server = serve_routes(routes, "127.0.0.1", 0, LIMITS)
    try:
        good_text = good_completion(server.server_port)
        yield Fuzzed(server, good_text, threading.active_count(), rss_kib())
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
        dist.destroy_process_group()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def exchange(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send `data` (then half-close, or stay silent) and read until the server closes; AssertionError if it neither
    answers nor closes within CLIENT_TIMEOUT_S."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):  # it answered and closed before taking all of it
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"no answer and no close within {CLIENT_TIMEOUT_S} s to {data[:200]!r}") from None
        return received


def request(method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A well-formed request that closes its connection after the answer."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    fields = {"Content-Length": str(len(body))} if headers is None else headers
    lines += [f"{name}: {value}" for name, value in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def status_of(answer: bytes) -> int | None:
    """The first answer's status; None when the server closed without one."""
    match = STATUS.match(answer)
    assert match or not answer, f"not an HTTP answer: {answer[:200]!r}"
    return int(match.group(1)) if match else None


def record(fuzzed: Fuzzed, answer: bytes, sent: bytes) -> int | None:
    """Count the first answer's status; assert that no answer (pipelined garbage may get several) is a 5xx, then
    that the good request still gets the same completion."""
    status = status_of(answer)
    fuzzed.statuses[str(status) if status is not None else "closed"] += 1
    every = [int(m.group(1)) for m in EVERY_STATUS.finditer(answer)]
    assert all(s < 500 for s in every), f"{every} for {sent[:300]!r}: {answer[:500]!r}"
    assert good_completion(fuzzed.port) == fuzzed.good_text, f"another completion after {sent[:300]!r}"
    return status


def good_completion(port: int) -> str:
    answer = exchange(port, request("POST", COMPLETIONS_PATH, json.dumps(GOOD).encode()))
    assert status_of(answer) == 200, answer[:500]
    document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert document["usage"]["completion_tokens"] == GOOD["max_tokens"], document
    text: str = document["choices"][0]["text"]
    return text


def expected_statuses(path: str, body: bytes) -> set[int]:
    """What the server may answer `body` with: 413 past the limit, 400 when its parser or the tokenizer refuses it,
    else 200 (404 for another model)."""
    if len(body) > LIMITS.max_body_bytes:
        return {413}
    try:
        parsed = PARSERS[path](body, MAX_NEW_TOKENS)
    except Exception:  # a ValueError naming the field; anything else must still be a 400, not a 500
        return {400}
    try:  # JSON takes lone surrogates ("\\ud800", or their UTF-8 bytes), the tokenizer refuses them
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return {400}
    model = getattr(parsed, "model", None)
    return {200} if model in (None, MODEL) else {404}


# Bodies: random JSON, and documents near the valid ones with wrong types and huge or odd values for known fields.
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "max_new_tokens", "temperature"]
FIELDS += ["top_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_k", "best_of", "echo", "user"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
odd_values = st.one_of(
    st.sampled_from([10**30, -(10**30), -1, 0, 2**63, "2", "NaN", "inf", "-1", "", [], {}, [[["x"]]], True]),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.lists(st.text(max_size=3), max_size=3), max_size=3),  # e.g. stop as nested lists
    st.text(max_size=12),
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot", ""]) | odd_values},
        optional={"content": st.text(max_size=12) | odd_values},
    ),
    max_size=3,
)
near_valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=12) | odd_values, "messages": messages | odd_values},
    optional={
        "model": st.just(MODEL) | odd_values,
        "max_tokens": st.integers(1, MAX_NEW_TOKENS) | odd_values,
        "max_new_tokens": st.integers(1, MAX_NEW_TOKENS) | odd_values,
        "temperature": st.sampled_from([0, 0.5, 2]) | odd_values,
        "top_p": st.sampled_from([0.5, 1]) | odd_values,
        "seed": st.integers(0, 100) | odd_values,
        "stop": st.text(min_size=1, max_size=3) | odd_values,
        "stream": st.booleans() | odd_values,
        "n": st.just(1) | odd_values,
    },
)
documents = st.one_of(
    near_valid,
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values | odd_values, max_size=6),
    json_values,
)
posts = st.sampled_from(sorted(PARSERS))


@FUZZ
@given(path=posts, document=documents)
def test_json_bodies_get_200_when_valid_and_a_4xx_otherwise(fuzzed: Fuzzed, path: str, document: Any) -> None:
    body = json.dumps(document).encode()  # NaN and Infinity included, as Python writes them
    sent = request("POST", path, body)
    status = record(fuzzed, exchange(fuzzed.port, sent), sent)
    assert status in expected_statuses(path, body), (status, body)


def nested(depth: int, kind: str) -> bytes:
    if kind == "arrays":
        return b"[" * depth + b"]" * depth
    if kind == "objects":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"prompt": "x", "stop": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=16).map(lambda b: b'{"prompt": "' + b + b'\xff\xfe\xc0"}'),  # invalid UTF-8 in a string
    st.sampled_from([b"\xef\xbb\xbf{}", b'{"prompt": "\xed\xa0\x80"}', b"\x00" * 8, b'"\\ud800"', b"1" * 5000]),
    st.builds(nested, st.sampled_from([1_000, 10_000, 30_000]), st.sampled_from(["arrays", "objects", "stop"])),
)


@FUZZ
@given(path=posts, body=raw_bodies)
def test_bodies_that_are_not_json_or_too_deep_get_400(fuzzed: Fuzzed, path: str, body: bytes) -> None:
    sent = request("POST", path, body)
    status = record(fuzzed, exchange(fuzzed.port, sent), sent)
    assert status in expected_statuses(path, body), (status, body[:200])


# Framing: what Content-Length and Transfer-Encoding say against what the body is.
GOOD_BODY = json.dumps(GOOD).encode()
bad_lengths = st.one_of(
    st.integers(max_value=-1).map(str),
    st.sampled_from([str(10**30), str(LIMITS.max_body_bytes + 1), "1e3", "+5", "0x10", "", "five", "5, 6", "١٢"]),
    st.text(max_size=6).filter(lambda t: not t.strip().isdigit() and "\r" not in t and "\n" not in t),
)


@FUZZ
@given(length=bad_lengths)
def test_a_malformed_negative_or_oversized_content_length_gets_a_4xx(fuzzed: Fuzzed, length: str) -> None:
    sent = request("POST", COMPLETIONS_PATH, GOOD_BODY, {"Content-Length": length})
    status = record(fuzzed, exchange(fuzzed.port, sent), sent)
    assert status is not None and 400 <= status < 500, (status, length)


@FUZZ
@given(missing=st.integers(1, 5000), kept=st.integers(0, len(GOOD_BODY)), half_close=st.booleans())
def test_a_truncated_body_gets_408_or_is_dropped_when_its_client_leaves(
    fuzzed: Fuzzed, missing: int, kept: int, half_close: bool
) -> None:
    headers = {"Content-Length": str(len(GOOD_BODY) + missing)}
    sent = request("POST", COMPLETIONS_PATH, GOOD_BODY[:kept], headers)
    status = record(fuzzed, exchange(fuzzed.port, sent, half_close), sent)
    if half_close:  # nobody to answer (or h11's 400 for the early end)
        assert status in (None, 400), status
    else:  # silent past the body deadline
        assert status == 408, status


def chunked(body: bytes, sizes: list[int], size_text: Callable[[int], str]) -> bytes:
    pieces, start = [], 0
    for size in sizes:
        pieces.append(size_text(size).encode() + b"\r\n" + body[start : start + size] + b"\r\n")
        start += size
    return b"".join(pieces) + b"0\r\n\r\n"


@FUZZ
@given(
    cuts=st.lists(st.integers(1, 40), max_size=6),
    form=st.sampled_from(["hex", "upper", "extension", "decimal-lie", "garbage", "oversize", "no-end"]),
)
def test_chunked_bodies_are_served_or_refused_with_a_4xx(fuzzed: Fuzzed, cuts: list[int], form: str) -> None:
    body = GOOD_BODY + b" " * (LIMITS.max_body_bytes + 1) if form == "oversize" else GOOD_BODY
    sizes, rest = [], len(body)
    for cut in cuts:
        sizes.append(min(cut, rest))
        rest -= sizes[-1]
    sizes = [s for s in sizes if s] + ([rest] if rest else [])
    size_text: Callable[[int], str] = {
        "upper": lambda n: f"{n:X}",
        "extension": lambda n: f"{n:x};name=value",
        "decimal-lie": lambda n: f"{n + 1}",  # one byte more than sent: the framing breaks
        "garbage": lambda n: f"z{n:x}",
    }.get(form, lambda n: f"{n:x}")
    encoded = chunked(body, sizes, size_text)
    if form == "no-end":
        encoded = encoded[: -len(b"0\r\n\r\n")]  # then silent: the body deadline
    sent = request("POST", COMPLETIONS_PATH, encoded, {"Transfer-Encoding": "chunked"})
    status = record(fuzzed, exchange(fuzzed.port, sent), sent)
    expected = {"hex": {200}, "upper": {200}, "extension": {200}, "oversize": {413}, "no-end": {408}}
    assert status in expected.get(form, {400, 408}), (form, status)


tokens = st.text(st.characters(codec="latin-1"), max_size=12)
request_lines = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda method, target, version: f"{method} {target} {version}".encode("latin-1"),
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "get", "G\x00T", ""]) | tokens,
        st.sampled_from(["/healthz", "/v1/models", COMPLETIONS_PATH, "*", "http://x/healthz", "/%00", ""]) | tokens,
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", "HTTP/9", ""]) | tokens,
    ),
)
header_lines = st.lists(
    st.one_of(
        st.builds(lambda name, value: f"{name}: {value}".encode("latin-1"), tokens, tokens),
        st.sampled_from([b"Host", b": value", b" folded: line", b"Content-Length: 3", b"Transfer-Encoding: gzip"]),
        st.sampled_from([b"X-Big: " + b"x" * 20_000, b"Content-Length: 1\r\nContent-Length: 2"]),
        st.binary(max_size=40),
    ),
    max_size=5,
)


@FUZZ
@given(line=request_lines, headers=header_lines, body=st.binary(max_size=32))
def test_garbage_request_lines_and_headers_get_a_4xx_or_a_close(
    fuzzed: Fuzzed, line: bytes, headers: list[bytes], body: bytes
) -> None:
    sent = b"\r\n".join([line, *headers]) + b"\r\n\r\n" + body
    status = record(fuzzed, exchange(fuzzed.port, sent), sent)
    assert status is None or 200 <= status < 500, status


def test_after_the_fuzz_the_server_is_bounded_and_answers_the_same(fuzzed: Fuzzed) -> None:
    assert fuzzed.good_text == good_completion(fuzzed.port)
    bound = fuzzed.threads_before + THREAD_SLACK
    threads = wait_for(f"at most {bound} threads", lambda: (n := threading.active_count()) <= bound and n)
    rss = rss_kib()
    print(
        f"\nhttp fuzz: {sum(fuzzed.statuses.values())} requests, statuses {dict(sorted(fuzzed.statuses.items()))};"
        f" threads {fuzzed.threads_before} -> {threads}; RSS {fuzzed.rss_before_kib >> 10} MiB -> {rss >> 10} MiB"
    )
    assert rss - fuzzed.rss_before_kib < RSS_SLACK_KIB
    assert fuzzed.server.in_flight == 0
