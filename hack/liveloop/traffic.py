"""A bounded load generator: `concurrency` threads send generate requests to one URL until stopped, and every request
is accounted for, answered or not. It stops by itself after `max_seconds`."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

GENERATE_PATH = "/v1/generate"


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (Unix time), how long it took, the HTTP status (0: no answer) and what came back."""

    started: float
    seconds: float
    status: int
    prompt: str
    generation: int | None = None
    tokens: tuple[int, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass(frozen=True)
class Tally:
    ok: int
    failed: int
    p50_s: float
    p99_s: float

    @classmethod
    def of(cls, outcomes: Sequence[Outcome]) -> Tally:
        seconds = [o.seconds for o in outcomes if o.ok]
        failed = sum(not o.ok for o in outcomes)
        return cls(len(outcomes) - failed, failed, percentile(seconds, 0.5), percentile(seconds, 0.99))

    def __str__(self) -> str:
        return f"{self.ok} ok, {self.failed} failed, p50 {self.p50_s * 1000:.0f} ms, p99 {self.p99_s * 1000:.0f} ms"


def generate(url: str, prompt: str, max_new_tokens: int, timeout_s: float) -> Outcome:
    """One POST of `{"prompt", "max_new_tokens"}` to `url`; never raises."""
    body = json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    started = time.time()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
            status = response.status
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode(errors="replace")
        return Outcome(started, time.time() - started, error.code, prompt, error=f"HTTP {error.code}: {detail}")
    except (OSError, ValueError) as error:
        return Outcome(started, time.time() - started, 0, prompt, error=f"{type(error).__name__}: {error}")
    return Outcome(
        started,
        time.time() - started,
        status,
        prompt,
        generation=answer.get("placementGeneration"),
        tokens=tuple(answer.get("tokens", ())),
    )


class Traffic:
    """Sends `prompt()` to `base_url` + /v1/generate from `concurrency` threads, from `start()` until `stop()`."""

    def __init__(
        self,
        base_url: str,
        prompt: Callable[[], str],
        *,
        concurrency: int = 4,
        max_new_tokens: int = 8,
        timeout_s: float = 120.0,
        max_seconds: float = 1800.0,
    ) -> None:
        self.url = base_url.rstrip("/") + GENERATE_PATH
        self.prompt = prompt
        self.concurrency = concurrency
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.max_seconds = max_seconds
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Traffic:
        deadline = time.monotonic() + self.max_seconds
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._run, args=(deadline,), name=f"traffic-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            outcome = generate(self.url, self.prompt(), self.max_new_tokens, self.timeout_s)
            with self._lock:
                self._outcomes.append(outcome)

    def stop(self) -> list[Outcome]:
        """Stops sending, waits for the requests in flight, and returns every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        return self.outcomes()

    def outcomes(self, since: float = 0.0) -> list[Outcome]:
        """The requests finished so far that started at or after `since` (Unix time)."""
        with self._lock:
            return [o for o in self._outcomes if o.started >= since]

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
