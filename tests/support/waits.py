"""Polling until something happens, failing with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
WAIT_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.25


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_TIMEOUT_S) -> T:
    """Polls `probe` until it returns something truthy and returns it; fails naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)
