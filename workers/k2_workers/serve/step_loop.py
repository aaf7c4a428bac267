"""The waiting queue of a continuously batched engine and its decoding thread (no torch).

Callers `enqueue` jobs into a bounded FIFO (`max_queue`: beyond it, `QueueFull`) and may `dequeue` them while they
wait. The decoding thread runs `step()` again and again while there is work: queued jobs or a busy batch
(`busy()`). A step takes the jobs it admits with `take_first`, in arrival order, so jobs join the running batch at the
next step instead of waiting for a whole batch to end. When the engine was idle, the thread waits `batch_wait_s`
before the first step, so callers that come together start together. `stop` refuses new jobs, runs until the
queue and the batch are empty, and joins the thread.

`GroupLock` is the group's lock: one group operation (a step, a placement change) at a time, taken in arrival
order, so a placement change waits for one step, not for a whole batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from k2_workers.serve.scheduler import QueueFull, Stopping

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # a step that found nothing to run waits this long before the next one
J = TypeVar("J")


class GroupLock:
    """A lock granted in arrival order (a ticket lock): a waiter is not overtaken by a thread that releases and
    takes it again at once."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def acquire(self, blocking: bool = True) -> bool:
        with self._changed:
            if not blocking and self._serving != self._next_ticket:
                return False
            ticket = self._next_ticket
            self._next_ticket += 1
            self._changed.wait_for(lambda: self._serving == ticket)
            return True

    def release(self) -> None:
        with self._changed:
            self._serving += 1
            self._changed.notify_all()

    def __enter__(self) -> GroupLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class StepLoop(Generic[J]):
    """A bounded FIFO of jobs and the thread that runs `step` while `busy()` or jobs wait."""

    def __init__(
        self,
        step: Callable[[], bool],
        busy: Callable[[], bool],
        running: Callable[[], int],
        held: Callable[[], int],
        max_batch_size: int,
        batch_wait_s: float,
        max_queue: int,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {max_queue}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s: must be >= 0, got {batch_wait_s}")
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self._step, self._busy, self._running, self._held = step, busy, running, held
        self._queue: deque[J] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Requests waiting: queued, or preempted and waiting to run again."""
        with self._changed:
            return len(self._queue) + self._held()

    @property
    def queued_requests(self) -> int:
        """Requests in the queue only (not the preempted ones)."""
        with self._changed:
            return len(self._queue)

    @property
    def in_batch(self) -> int:
        """Sequences in the running batch."""
        return self._running()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def enqueue(self, job: J) -> None:
        """Queue `job`; `QueueFull` when `max_queue` wait already, `Stopping` once `stop` began."""
        with self._changed:
            if self._stopping:
                raise Stopping("the server is stopping: no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full: {self.max_queue} requests wait already")
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
                self._thread.start()
            self._changed.notify()

    def dequeue(self, job: J) -> bool:
        """Take `job` out of the queue; False when a step took it already."""
        with self._changed:
            if job in self._queue:
                self._queue.remove(job)
                return True
            return False

    def take_first(self, accept: Callable[[J], bool]) -> J | None:
        """The first queued job, out of the queue, if `accept(job)` (called under the queue's lock) says so."""
        with self._changed:
            if self._queue and accept(self._queue[0]):
                return self._queue.popleft()
            return None

    def stop(self) -> None:
        """Refuse new jobs, run the queued and running ones to their end, then return."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or self._busy() or self._stopping)
                if not self._queue and not self._busy():
                    return  # stopping, and nothing is left
                idle = not self._busy()
            if idle and self.batch_wait_s:
                time.sleep(self.batch_wait_s)  # callers on their way (clients coming back together) start together
            try:
                progressed = self._step()
            except Exception:  # the step failed its requests already; the next ones get a fresh batch
                log.exception("a decoding step failed")
                continue
            if not progressed:
                with self._changed:
                    self._changed.wait(IDLE_POLL_S)
