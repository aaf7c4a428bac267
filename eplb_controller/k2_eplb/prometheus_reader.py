"""Read per-expert load from Prometheus' HTTP API.

`increase()` over the window does the counter arithmetic, including resets (a worker restart): Prometheus treats any
decrease of a counter as a reset and adds the new value, and extrapolates to the window's edges. Ranks count as
reporting when their series are present at the query instant: a failed scrape makes Prometheus mark the target's
series stale at once, so a rank that went down stops counting within one scrape interval.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from email.message import Message
from typing import IO

from k2_api.contract import MetricLabels, Metrics
from k2_eplb.load import (
    LoadReadError,
    LoadSample,
    group_load_matrices,
    label_index,
    measured_balancedness,
    merge_groups,
    token_count,
)

Fetch = Callable[[str, float], bytes]
"""(url, timeout seconds) -> response body."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: an allowed server must not send the controller to another host."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Message, newurl: str
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(req.full_url, code, f"{msg}: redirect to {newurl} not followed", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirects)


MAX_BODY_BYTES = 64 * 2**20
"""The largest answer a reader takes (a rank page of 60 layers x 384 experts is about 5 MB)."""


def http_get(url: str, timeout: float, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """GET `url` without following redirects; a non-2xx answer is an HTTPError (an OSError), a body over `max_bytes`
    a ValueError (read no further)."""
    with _OPENER.open(url, timeout=timeout) as response:
        length = response.length  # what Content-Length left to read; None for a chunked answer
        if length is not None and length > max_bytes:
            raise ValueError(f"answer larger than {max_bytes} bytes")
        # A full read checks Content-Length (IncompleteRead when cut short); a chunked one is read up to the limit.
        body: bytes = response.read() if length is not None else response.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise ValueError(f"answer larger than {max_bytes} bytes")
    return body


def url_allowed(url: str, allowed: Iterable[str]) -> bool:
    """Whether `url` lies under one of the `allowed` URL prefixes: the same scheme, host and port, and a path equal to
    the prefix's or below it (`http://t:10902/a` allows `/a/b`, not `/ab`). A URL with credentials, a query or a
    fragment is never allowed."""
    target = _origin_and_path(url)
    if target is None:
        return False
    origin, path = target
    for prefix in allowed:
        entry = _origin_and_path(prefix)
        if entry is not None and entry[0] == origin and (path + "/").startswith(entry[1] + "/"):
            return True
    return False


def _origin_and_path(url: str) -> tuple[tuple[str, str, int], str] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. a port that is not a number
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
    ):
        return None
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return None
    default_port = 443 if scheme == "https" else 80
    return (scheme, parts.hostname.lower(), port or default_port), parts.path.rstrip("/")


def selector(labels: Mapping[str, str]) -> str:
    """A PromQL label matcher `{a="x",b="y"}` with the values escaped."""
    escaped = {name: value.replace("\\", "\\\\").replace('"', '\\"') for name, value in labels.items()}
    return "{" + ",".join(f'{name}="{value}"' for name, value in escaped.items()) + "}"


class PrometheusLoadReader:
    """Load of one serving over a window, from the Prometheus at `url` (http://host:port, no trailing path)."""

    def __init__(self, url: str, *, timeout: float = 10.0, fetch: Fetch = http_get):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"prometheusUrl: {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._fetch = fetch

    def read(
        self,
        labels: Mapping[str, str],
        *,
        window_seconds: float,
        num_layers: int,
        num_experts: int,
        ranks_expected: int,
    ) -> LoadSample:
        """Tokens per (layer, expert) over the last `window_seconds`, for the series matching `labels`.

        `labels` selects the serving, e.g. {"serving": "k2", "namespace": "prod"}.
        """
        if window_seconds < 1:
            raise ValueError(f"windowSeconds: {window_seconds} must be >= 1")
        sel = selector(labels)
        window = f"[{int(window_seconds)}s]"
        experts, slots = Metrics.EXPERT_TOKENS.name + sel, Metrics.SLOT_TOKENS.name + sel
        group, rank, layer, expert = MetricLabels.GROUP, MetricLabels.RANK, MetricLabels.LAYER, MetricLabels.EXPERT
        load_rows = self.query(f"sum by ({group}, {layer}, {expert}) (increase({experts}{window}))", "load")
        try:
            by_group, dropped = group_load_matrices(load_rows, num_layers=num_layers, num_experts=num_experts)
            load_LE = merge_groups(by_group, num_layers, num_experts)
        except LoadReadError as error:
            raise LoadReadError(f"prometheus {self.url}: load query: {error}") from None
        ranks = self.query(f"count by ({group}, {rank}) ({experts})", "ranks")
        samples = self.query(f"min(count_over_time({experts}{window}))", "samples")
        slot_rows = self.query(f"sum by ({group}, {rank}, {layer}) (increase({slots}{window}))", "slots")
        try:
            slot_tokens = {
                (labels.get(group, ""), labels.get(rank, ""), label_index(labels, layer, f"series {labels}")): value
                for labels, value in slot_rows
            }
            balancedness = measured_balancedness(slot_tokens)
        except LoadReadError as error:
            raise LoadReadError(f"prometheus {self.url}: slots query: {error}") from None
        return LoadSample(
            load_LE=load_LE,
            ranks_seen=len(ranks),
            ranks_expected=ranks_expected,
            num_samples=int(samples[0][1]) if samples else 0,
            window_seconds=window_seconds,
            source="prometheus",
            measured_balancedness=balancedness,
            dropped_series=dropped,
            group_load_LE=by_group,
        )

    def query(self, promql: str, name: str = "query") -> list[tuple[dict[str, str], float]]:
        """Run an instant query; returns the (labels, value) rows of its result vector, every value a finite count.

        Anything else (no answer, not JSON, another shape, NaN, infinities, negative values) is a LoadReadError
        naming the query `name` and the problem.
        """
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            body = self._fetch(url, self.timeout)
        except (OSError, ValueError, http.client.HTTPException) as error:  # HTTPException: the answer is not HTTP
            raise LoadReadError(f"prometheus {self.url}: {name} query: {error}") from error
        try:
            return parse_vector(body)
        except LoadReadError as error:
            raise LoadReadError(f"prometheus {self.url}: {name} query: {error}") from None


def parse_vector(body: bytes) -> list[tuple[dict[str, str], float]]:
    """The (labels, value) rows of an instant-query answer whose result is a vector of finite, non-negative values."""
    try:
        answer = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError included
        raise LoadReadError(f"answer is not JSON ({error}): {body[:80]!r}") from None
    if not isinstance(answer, dict):
        raise LoadReadError(f"answer is not a JSON object: {body[:80]!r}")
    if answer.get("status") != "success":
        raise LoadReadError(f"status {answer.get('status')!r}: {answer.get('errorType')}: {answer.get('error')}")
    data = answer.get("data")
    if not isinstance(data, dict):
        raise LoadReadError(f"answer has no data object: {body[:80]!r}")
    if data.get("resultType") != "vector":
        raise LoadReadError(f"expected a vector, got {data.get('resultType')!r}")
    result = data.get("result")
    if not isinstance(result, list):
        raise LoadReadError(f"data.result is not a list: {result!r:.80}")
    return [_row(index, row) for index, row in enumerate(result)]


def _row(index: int, row: object) -> tuple[dict[str, str], float]:
    what = f"row {index}"
    if not isinstance(row, dict):
        raise LoadReadError(f"{what}: not an object: {row!r:.80}")
    labels, value = row.get("metric"), row.get("value")
    if not isinstance(labels, dict) or not all(isinstance(text, str) for text in labels.values()):
        raise LoadReadError(f"{what}: metric is not an object of string labels: {labels!r:.80}")
    if not isinstance(value, list) or len(value) != 2:
        raise LoadReadError(f"{what}: value is not a [time, value] pair: {value!r:.80}")
    return labels, token_count(value[1], f"{what} {labels}")
