"""The batching scheduler on its own (no model): batches of at most max_batch_size, each caller its own result, a
failed batch fails each of its callers as a server error, and stop finishes the queue first."""

from __future__ import annotations

import threading

import pytest

from k2_workers.serve.scheduler import BatchScheduler, Cancelled, DeadlineExceeded, QueueFull
from tests.support.waits import wait_for


class Recorder:
    """A batch function that doubles each job, records the batches, and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_with: Exception | None = None

    def __call__(self, jobs: list[int]) -> list[int]:
        self.batches.append(list(jobs))
        self.release.wait(timeout=60)
        if self.fail_with is not None:
            raise self.fail_with
        return [2 * job for job in jobs]


def submit_all(
    scheduler: BatchScheduler[int, int], jobs: list[int]
) -> tuple[list[threading.Thread], dict[int, object]]:
    results: dict[int, object] = {}

    def call(job: int) -> None:
        try:
            results[job] = scheduler.submit(job)
        except Exception as error:
            results[job] = error

    threads = [threading.Thread(target=call, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    return threads, results


def test_jobs_queued_behind_a_batch_share_batches_of_at_most_max_batch_size() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, max_batch_size=2, batch_wait_s=0)
    run.release.clear()
    first, results = submit_all(scheduler, [0])
    wait_for("the first batch to start", lambda: run.batches)
    rest, more = submit_all(scheduler, [1, 2, 3, 4, 5])
    wait_for("five queued jobs", lambda: scheduler.queued == 5)
    run.release.set()
    for thread in first + rest:
        thread.join(timeout=60)
    assert {**results, **more} == {job: 2 * job for job in range(6)}
    assert run.batches[0] == [0] and [len(batch) for batch in run.batches[1:]] == [2, 2, 1]
    assert sorted(job for batch in run.batches for job in batch) == list(range(6))
    scheduler.stop()


def test_a_failed_batch_fails_each_caller_with_a_runtime_error_and_the_next_batch_runs() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, batch_wait_s=0.2)
    run.fail_with = ValueError("a rank stopped answering")
    threads, results = submit_all(scheduler, [1, 2])
    for thread in threads:
        thread.join(timeout=60)
    for error in results.values():  # not the ValueError, which the HTTP layer would answer with 400
        assert isinstance(error, RuntimeError) and "decoding failed: a rank stopped" in str(error)
        assert isinstance(error.__cause__, ValueError)
    run.fail_with = None
    assert scheduler.submit(3) == 6
    scheduler.stop()


def test_stop_finishes_the_queued_jobs_then_refuses_new_ones() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, max_batch_size=1, batch_wait_s=0)
    run.release.clear()
    threads, results = submit_all(scheduler, [1, 2, 3])
    wait_for("a batch running and two queued", lambda: run.batches and scheduler.queued == 2)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    run.release.set()
    stopper.join(timeout=60)
    for thread in threads:
        thread.join(timeout=60)
    assert results == {1: 2, 2: 4, 3: 6}
    with pytest.raises(RuntimeError, match="stopping"):
        scheduler.submit(4)


@pytest.mark.parametrize(
    ("size", "wait", "queue", "field"),
    [(0, 0.0, 1, "max_batch_size"), (1, -1.0, 1, "batch_wait_s"), (1, 0.0, 0, "max_queue")],
)
def test_bad_settings_name_the_field(size: int, wait: float, queue: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BatchScheduler(Recorder(), max_batch_size=size, batch_wait_s=wait, max_queue=queue)


def test_a_job_beyond_max_queue_is_refused_while_the_queued_ones_still_run() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, max_batch_size=1, batch_wait_s=0, max_queue=2)
    run.release.clear()
    threads, results = submit_all(scheduler, [1])
    wait_for("the first batch to start", lambda: run.batches)
    more, queued = submit_all(scheduler, [2, 3])
    wait_for("two queued jobs", lambda: scheduler.queued == 2)
    with pytest.raises(QueueFull, match="2 requests wait already"):
        scheduler.submit(4)
    run.release.set()
    for thread in threads + more:
        thread.join(timeout=60)
    assert {**results, **queued} == {1: 2, 2: 4, 3: 6}
    assert [job for batch in run.batches for job in batch] == [1, 2, 3]
    scheduler.stop()


def test_a_job_past_its_deadline_leaves_the_queue_and_never_runs() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, max_batch_size=1, batch_wait_s=0)
    run.release.clear()
    threads, results = submit_all(scheduler, [1])
    wait_for("the first batch to start", lambda: run.batches)
    with pytest.raises(DeadlineExceeded, match="passed in the queue"):
        scheduler.submit(2, timeout_s=0.2)
    assert scheduler.queued == 0
    run.release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {1: 2} and run.batches == [[1]]
    scheduler.stop()


def test_a_job_cancelled_while_queued_leaves_the_queue_and_never_runs() -> None:
    run = Recorder()
    scheduler: BatchScheduler[int, int] = BatchScheduler(run, max_batch_size=1, batch_wait_s=0)
    run.release.clear()
    threads, results = submit_all(scheduler, [1])
    wait_for("the first batch to start", lambda: run.batches)
    gone = threading.Event()
    threading.Timer(0.2, gone.set).start()
    with pytest.raises(Cancelled):
        scheduler.submit(2, cancelled=gone.is_set)
    assert scheduler.queued == 0
    run.release.set()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {1: 2} and run.batches == [[1]]
    assert scheduler.submit(3, cancelled=lambda: False) == 6  # not cancelled: answered as usual
    scheduler.stop()
