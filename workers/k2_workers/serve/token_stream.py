"""One request's tokens, handed from the decoding thread to its caller as they are decoded (no torch here).

The decoding thread `begin`s the stream when the request's batch starts, `put`s each token of its row and `end`s it
when the row leaves the batch (or the batch fails). The caller iterates the tokens; the stream ends after the last
one, or raises: `DeadlineExceeded` past the request's deadline, `Cancelled` when the caller's `cancelled()` turns
true (asked every `CANCEL_POLL_S` while it waits), a RuntimeError from the batch's failure. Leaving early (either of
those, or closing the iterator) cancels the request: still queued, it leaves the queue; in a batch, its row leaves
at the next decoding step (`wanted` turns false).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from k2_workers.serve.scheduler import CANCEL_POLL_S, Cancelled, DeadlineExceeded


@dataclass(frozen=True)
class _End:
    error: BaseException | None = None


class TokenStream:
    """The tokens of one request. Producer side: `begin`, `put`, `end` (the decoding thread). Consumer side:
    iteration and `cancel` (the caller's thread)."""

    def __init__(
        self,
        timeout_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        dequeue: Callable[[], bool] = lambda: False,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self._items: queue.SimpleQueue[int | _End] = queue.SimpleQueue()
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s  # counted from the submission
        self._client_gone = cancelled
        self._dequeue = dequeue  # takes the request out of the queue; False once a batch took it
        self._on_cancel = on_cancel
        self._cancelled = threading.Event()
        self._began = threading.Event()
        self._ended = False  # consumer side: the end was read
        self.batch_size = 0  # set by `begin`, before the first token
        self.placement_generation = -1

    # --- the decoding thread ---------------------------------------------------------------------------------------
    def begin(self, batch_size: int, placement_generation: int) -> None:
        self.batch_size, self.placement_generation = batch_size, placement_generation
        self._began.set()

    def put(self, token: int) -> None:
        self._items.put(token)

    def end(self, error: BaseException | None = None) -> None:
        self._items.put(_End(error))

    @property
    def wanted(self) -> bool:
        """Whether the caller still reads this stream (its row stays in the batch)."""
        return not self._cancelled.is_set()

    # --- the caller ------------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request: out of the queue if no batch took it yet, else out of its batch at the next step."""
        if self._cancelled.is_set() or self._ended:
            return
        self._cancelled.set()
        if self._dequeue():
            self._items.put(_End(Cancelled("the request was cancelled while queued")))
        if self._on_cancel is not None:
            self._on_cancel()

    def __iter__(self) -> Iterator[int]:
        deadline = self._deadline
        try:
            while True:
                wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self._client_gone is not None:
                    wait_s = CANCEL_POLL_S if wait_s is None else min(wait_s, CANCEL_POLL_S)
                try:
                    item = self._items.get(timeout=wait_s)
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        where = "while its batch ran" if self._began.is_set() else "in the queue"
                        message = f"the request's deadline of {self._timeout_s} s passed {where}"
                        raise DeadlineExceeded(message) from None
                    if self._client_gone is not None and self._client_gone():
                        raise Cancelled("the request's client went away") from None
                    continue
                if isinstance(item, _End):
                    self._ended = True
                    if isinstance(item.error, Cancelled):
                        raise item.error
                    if item.error is not None:
                        raise RuntimeError(f"decoding failed: {item.error}") from item.error
                    return
                yield item
        finally:  # left before the end: a deadline, a client gone, or the caller closed the iterator
            self.cancel()
