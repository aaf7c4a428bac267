"""Iteration-level scheduling decisions on their own (no model): decoding rows first, prompts in chunks within the
step's budget, admission in arrival order, preemption of the newest sequence when blocks run out, and a finished
sequence's blocks free at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest

from k2_workers.serve.batcher import Batcher, Sequence, StepPlan
from k2_workers.serve.blocks import BlockManager


class Queue:
    """The waiting requests, as the engine's step loop hands them out."""

    def __init__(self, *seqs: Sequence) -> None:
        self.items = deque(seqs)

    def take(self, accept: Callable[[Sequence], bool]) -> Sequence | None:
        if self.items and accept(self.items[0]):
            return self.items.popleft()
        return None


def run(batcher: Batcher, queue: Queue, next_token: int = 7) -> StepPlan:
    """Plan a step, pretend it ran, and append a sampled token to every row that reached its end."""
    plan = batcher.plan(queue.take)
    batcher.commit(plan)
    for work in plan.work:
        if work.samples:
            work.seq.tokens.append(next_token)
    return plan


def rows(plan: StepPlan) -> list[tuple[int, int, int]]:
    return [(w.seq.id, w.start, len(w.tokens)) for w in plan.work]


def test_prompts_are_chunked_within_the_budget_and_decoding_rows_go_first() -> None:
    batcher = Batcher(BlockManager(64, 4), max_running=4, max_step_tokens=10, max_chunk_tokens=6)
    short, long = Sequence(0, [1, 2, 3], 5), Sequence(1, list(range(20)), 5)
    queue = Queue(short, long)
    assert rows(run(batcher, queue)) == [(0, 0, 3), (1, 0, 6)]  # both join; the budget cuts the second's chunk
    assert rows(run(batcher, queue)) == [(0, 3, 1), (1, 6, 6)]  # short decodes while long goes on prefilling
    assert rows(run(batcher, queue)) == [(0, 4, 1), (1, 12, 6)]
    plan = run(batcher, queue)
    assert rows(plan) == [(0, 5, 1), (1, 18, 2)] and [w.samples for w in plan.work] == [True, True]
    assert rows(run(batcher, queue)) == [(0, 6, 1), (1, 20, 1)]  # both decode


def test_admission_is_first_come_first_served_and_bounded_by_the_running_sequences() -> None:
    batcher = Batcher(BlockManager(64, 4), max_running=2, max_step_tokens=100, max_chunk_tokens=50)
    seqs = [Sequence(i, [i + 1] * 4, 3) for i in range(4)]
    queue = Queue(*seqs)
    assert [s.id for s in run(batcher, queue).admitted] == [0, 1]
    assert len(queue.items) == 2 and run(batcher, queue).admitted == []
    batcher.finish(seqs[1])  # it leaves at once; the next in line takes its place
    assert [s.id for s in run(batcher, queue).admitted] == [2]


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_recomputes_everything_later() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    batcher = Batcher(blocks, max_running=4, max_step_tokens=20, max_chunk_tokens=20)
    old, new = Sequence(0, [1, 2, 3], 8), Sequence(1, [4, 5, 6], 8)
    queue = Queue(old, new)
    run(batcher, queue)  # both prefilled: two blocks each, the pool is full
    assert blocks.free == 0
    run(batcher, queue)  # each decodes its 4th token into its second block
    plan = run(batcher, queue)  # the 5th token needs a third block each: the newest gives way
    assert [s.id for s in plan.preempted] == [1] and rows(plan) == [(0, 4, 1)]
    assert batcher.preemptions == 1 and new.computed == 0 and list(batcher.preempted) == [new]
    assert new.tokens == [4, 5, 6, 7, 7]  # what it generated stays: it is recomputed, not sent again
    batcher.finish(old)
    plan = run(batcher, queue)
    assert plan.admitted == [new] and rows(plan) == [(1, 0, 5)]  # prompt and generated tokens, computed afresh


def test_a_finished_sequence_gives_its_blocks_back_at_once() -> None:
    blocks = BlockManager(8, 4)
    batcher = Batcher(blocks, max_running=2, max_step_tokens=40, max_chunk_tokens=40)
    seq = Sequence(0, list(range(9)), 4)
    run(batcher, Queue(seq))
    assert blocks.used == 3
    batcher.finish(seq)
    assert blocks.used == 0 and not batcher.busy


def test_a_step_budget_must_leave_room_beyond_the_decoding_rows() -> None:
    with pytest.raises(ValueError, match="max_step_tokens"):
        Batcher(BlockManager(8, 4), max_running=8, max_step_tokens=8, max_chunk_tokens=4)
