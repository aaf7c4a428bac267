"""Static batching of requests: a queue, one decoding thread, a short batch wait and a maximum batch size.

Callers `submit` a job and wait. The decoding thread takes up to `max_batch_size` queued jobs as one batch, after
waiting `batch_wait_s` for jobs already on their way (callers that come back together then share a batch instead of
splitting into one and the rest; one thread also keeps the CPU kernels on one OpenMP team instead of one per HTTP
thread), runs the batch function on them and hands each caller its result. A batch runs to its end: a job that
arrives meanwhile waits for the next batch. The queue is bounded (`max_queue`: a job beyond it is refused with
`QueueFull`), and a caller may give a deadline: a job still queued when it passes is dropped from the queue
(`DeadlineExceeded`); one already in a batch runs to the batch's end (the group decodes in lockstep), and its
caller is answered at the deadline. A caller may also give `cancelled` (its client went away), asked every
`CANCEL_POLL_S` while the job waits: a job still queued then leaves the queue (`Cancelled`); one in a batch runs to
its end, as with a deadline. A caller that follows its job some other way (the engine's token streams) `enqueue`s
it instead, and may `dequeue` it while no batch took it. Nothing here knows what a job is (no torch).

The serving engine batches continuously now (`step_loop`, `batcher`); this static scheduler is the baseline that
`benchmarks/serving_engine.py` measures it against, and the home of the request errors both raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.002
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT_S = 300.0
CANCEL_POLL_S = 0.1  # how often a waiting caller asks whether it was cancelled


class QueueFull(RuntimeError):
    """The queue holds `max_queue` jobs already: try again later."""


class DeadlineExceeded(RuntimeError):
    """The job's deadline passed before its result was ready."""


class Cancelled(RuntimeError):
    """The caller cancelled the job while it was queued: it never ran."""


class Stopping(RuntimeError):
    """The scheduler is stopping and takes no new jobs."""


J = TypeVar("J")  # a job
R = TypeVar("R")  # its result


@dataclass(eq=False)  # identity: a job leaves the queue by `remove`
class Pending(Generic[J, R]):
    job: J
    done: threading.Event = field(default_factory=threading.Event)
    result: R | None = None
    error: BaseException | None = None


class BatchScheduler(Generic[J, R]):
    """Runs `run_batch(jobs) -> results` (one result per job, in order) on batches of submitted jobs."""

    def __init__(
        self,
        run_batch: Callable[[list[J]], list[R]],
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue: must be >= 1, got {max_queue}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s: must be >= 0, got {batch_wait_s}")
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self._run_batch = run_batch
        self._queue: list[Pending[J, R]] = []
        self._queue_changed = threading.Condition()
        self._stopping = False
        self._running = 0
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch (not those being run)."""
        with self._queue_changed:
            return len(self._queue)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def in_batch(self) -> int:
        """Jobs of the batch being run."""
        with self._queue_changed:
            return self._running

    def submit(self, job: J, timeout_s: float | None = None, cancelled: Callable[[], bool] | None = None) -> R:
        """The result of `job`, once a batch has run it. Thread-safe. A failed batch raises a RuntimeError from
        its error in each of its callers (a server-side failure, whatever its type: a ValueError would read as a
        bad request). Raises `QueueFull` when `max_queue` jobs wait already, `DeadlineExceeded` after
        `timeout_s` (the job leaves the queue if no batch took it yet), `Cancelled` when `cancelled()` turns true
        while the job is queued."""
        pending = self.enqueue(job)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not pending.done.is_set():
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            if cancelled is not None:
                wait_s = CANCEL_POLL_S if wait_s is None else min(wait_s, CANCEL_POLL_S)
            if pending.done.wait(wait_s):
                break
            if deadline is not None and time.monotonic() >= deadline:
                queued = self.dequeue(pending)
                where = "in the queue" if queued else "while its batch ran"
                raise DeadlineExceeded(f"the request's deadline of {timeout_s} s passed {where}")
            if cancelled is not None and cancelled() and self.dequeue(pending):
                raise Cancelled("the request was cancelled while queued")
        if pending.error is not None:
            raise RuntimeError(f"decoding failed: {pending.error}") from pending.error
        assert pending.result is not None
        return pending.result

    def enqueue(self, job: J) -> Pending[J, R]:
        """Queue `job` without waiting for it (its batch function reports its progress some other way); raises
        `QueueFull` or `Stopping` as `submit` does. `dequeue` takes it back while no batch took it."""
        pending: Pending[J, R] = Pending(job)
        with self._queue_changed:
            if self._stopping:
                raise Stopping("the server is stopping: no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full: {self.max_queue} requests wait already")
            self._queue.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
                self._thread.start()
            self._queue_changed.notify()
        return pending

    def dequeue(self, pending: Pending[J, R]) -> bool:
        """Take `pending` out of the queue; False when a batch took it already."""
        with self._queue_changed:
            queued = pending in self._queue
            if queued:
                self._queue.remove(pending)
            return queued

    def stop(self) -> None:
        """Refuse new jobs, finish the queued ones, then return."""
        with self._queue_changed:
            self._stopping = True
            self._queue_changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        """The decoding thread: batches until `stop`, then drains the queue."""
        while True:
            with self._queue_changed:
                self._queue_changed.wait_for(lambda: bool(self._queue) or self._stopping)
                if not self._queue:
                    return
            time.sleep(self.batch_wait_s)  # jobs on their way (clients coming back together) join this batch
            with self._queue_changed:
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
                self._running = len(batch)
            self._run(batch)
            with self._queue_changed:
                self._running = 0

    def _run(self, batch: list[Pending[J, R]]) -> None:
        try:
            results = self._run_batch([p.job for p in batch])
            assert len(results) == len(batch), f"{len(results)} results for {len(batch)} jobs"
        except BaseException as error:  # every caller must wake up, whatever happened
            for pending in batch:
                pending.error = error
                pending.done.set()
            if not isinstance(error, Exception):
                raise
            log.exception("a batch of %d requests failed", len(batch))
            return
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()
