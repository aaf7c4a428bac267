"""How long a frontend request that no group took waits for one: rounds over the groups with pauses between them.

A group that does not take a request is often only briefly away: during a rolling update one group restarts while
the other serves, and for a few seconds the cluster DNS may still give the restarted group's old address, or a new
pod's that listens on nothing yet; a gang restart re-forms a group in seconds. Answering 503 at the first round
would fail requests that a second round a moment later serves. Waiting is safe: no group ran the request, so no
round runs it twice.

The first round starts at once, each next one after a pause that doubles from `FIRST_PAUSE_S` up to `MAX_PAUSE_S`,
and no round starts after `wait_s` (the client's own deadline, when shorter, ends it sooner). Torch-free: the
frontend imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

DEFAULT_WAIT_S = 20.0  # past the local cluster DNS's cache (5 s TTL + 5 s cache) and a rank pod's restart
FIRST_PAUSE_S = 0.25
MAX_PAUSE_S = 2.0


@dataclass(frozen=True)
class GroupWait:
    """`wait_s`: the longest a request waits, from its first round, for a group to take it (0: one round)."""

    wait_s: float = DEFAULT_WAIT_S

    def __post_init__(self) -> None:
        if not self.wait_s >= 0:
            raise ValueError(f"group wait: wait_s must be >= 0 seconds, got {self.wait_s}")

    def rounds(
        self,
        budget_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[int]:
        """Round numbers 0, 1, ...; between two, the pause. `budget_s` (the caller's time left) caps `wait_s`."""
        wait_s = self.wait_s if budget_s is None else min(self.wait_s, budget_s)
        deadline = clock() + wait_s
        pause, round_number = FIRST_PAUSE_S, 0
        while True:
            yield round_number
            round_number += 1
            left = deadline - clock()
            if left <= 0:
                return
            sleep(min(pause, left))
            pause = min(2 * pause, MAX_PAUSE_S)
