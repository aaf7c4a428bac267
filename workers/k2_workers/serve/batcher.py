"""Iteration-level scheduling: which tokens of which sequences the next step computes (pure decisions, no torch).

A step feeds every running sequence its pending tokens, within a budget of `max_step_tokens` tokens:
- decoding sequences (one pending token: the one sampled last) first, one token each, oldest first;
- then prefilling sequences, oldest first, a chunk of at most `max_chunk_tokens` each from what the budget leaves
  (chunked prefill: a long prompt takes several steps and never stalls the decoding rows);
- then new sequences join, first come first served, while fewer than `max_running` run and the budget and the
  free blocks allow their first chunk. A new sequence starts from the longest cached prefix of its tokens
  (`BlockManager.admit`), so a shared prompt prefix is computed once.

A sequence leaves the batch as soon as the engine `finish`es it (its end, or its caller gone), and its blocks are
free for the next step.

Preemption by recompute: when a running sequence needs a block and none is free, the newest running sequence is
preempted: it gives back all its blocks and waits again, ahead of every request that arrived after it, and when it
runs again it computes its prompt and the tokens it had generated afresh (prefix sharing may find its old blocks
still cached). Nothing it sent is sent again; its sampler's state is kept, so the completion is the same.

Fairness: admission is strictly in arrival order (a waiting request is never overtaken), and the oldest running
sequence is never preempted while a newer one runs, so a request waits at most for those that arrived before it.
A request that could not fit the whole cache alone is refused before it is queued (`fits`).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from k2_workers.serve.blocks import BlockManager


@dataclass(eq=False)
class Sequence:
    """One request's decoding state: its prompt then the tokens sampled so far, of which `computed` are cached."""

    id: int
    tokens: list[int]
    max_new_tokens: int
    prompt_len: int = field(init=False)
    computed: int = 0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_len = len(self.tokens)

    @property
    def pending(self) -> int:
        """Tokens not in the cache yet: the prompt's rest, or the token sampled last."""
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass(frozen=True)
class Work:
    """One row of a step: `tokens` fed at positions `start`.. of `seq`, whose blocks are `blocks`; it `samples`
    when it reaches the end of the sequence's tokens (its last logits give the next token)."""

    seq: Sequence
    start: int
    tokens: list[int]
    blocks: list[int]
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    work: list[Work]
    admitted: list[Sequence]  # joined the batch at this step (a preempted one again)
    preempted: list[Sequence]


Take = Callable[[Callable[[Sequence], bool]], Sequence | None]  # the first waiting sequence, if `accept`ed


class Batcher:
    """The running sequences and those preempted; new ones come from the caller's queue (`plan`'s `take`)."""

    def __init__(self, blocks: BlockManager, max_running: int, max_step_tokens: int, max_chunk_tokens: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_running}")
        if max_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {max_chunk_tokens}")
        if max_step_tokens <= max_running:
            raise ValueError(f"max_step_tokens: must be more than max_batch_size {max_running}, got {max_step_tokens}")
        self.blocks = blocks
        self.max_running = max_running
        self.max_step_tokens = max_step_tokens
        self.max_chunk_tokens = max_chunk_tokens
        self.running: list[Sequence] = []  # in arrival order (ids grow with arrival)
        self.preempted: deque[Sequence] = deque()  # in arrival order, ahead of every queued request
        self.preemptions = 0

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens (prompt and new ones) fits the cache on its own."""
        return self.blocks.blocks_for(num_tokens) <= self.blocks.num_blocks

    @property
    def busy(self) -> bool:
        return bool(self.running or self.preempted)

    def plan(self, take: Take) -> StepPlan:
        """The next step's work; sequences may be preempted (out of `running`) and new ones admitted."""
        budget = self.max_step_tokens
        scheduled: dict[int, Work] = {}
        preempted: list[Sequence] = []
        decoding = [s for s in self.running if s.pending == 1]
        prefilling = [s for s in self.running if s.pending > 1]
        for seq in decoding + prefilling:
            if seq not in self.running:  # preempted meanwhile
                continue
            size = min(seq.pending, self.max_chunk_tokens, budget)
            if size == 0:
                break
            while not self.blocks.reserve(seq.id, seq.computed + size):
                victim = self.running[-1]
                assert len(self.running) > 1 or victim is not seq, "a sequence alone does not fit the cache"
                self._preempt(victim)
                preempted.append(victim)
                if (dropped := scheduled.pop(victim.id, None)) is not None:
                    budget += len(dropped.tokens)
                if victim is seq:
                    break
            else:
                scheduled[seq.id] = self._work(seq, size)
                budget -= size
        admitted = [] if preempted else self._admit(take, budget, scheduled)
        work = [scheduled[s.id] for s in self.running if s.id in scheduled]
        return StepPlan(work, admitted, preempted)

    def commit(self, plan: StepPlan) -> None:
        """The plan's step ran: its rows' tokens are cached."""
        for row in plan.work:
            if row.seq in self.running:
                row.seq.computed = row.start + len(row.tokens)
                self.blocks.commit(row.seq.id, row.seq.tokens, row.seq.computed)

    def finish(self, seq: Sequence) -> None:
        """`seq` leaves (its end, or its caller gone): its blocks are free at once."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.preempted:
            self.preempted.remove(seq)
        self.blocks.release(seq.id)

    def _admit(self, take: Take, budget: int, scheduled: dict[int, Work]) -> list[Sequence]:
        admitted: list[Sequence] = []
        sizes: dict[int, int] = {}

        def accept(seq: Sequence) -> bool:
            seq.computed = self.blocks.admit(seq.id, seq.tokens)
            size = min(seq.pending, self.max_chunk_tokens, budget)
            if self.blocks.reserve(seq.id, seq.computed + size):
                sizes[seq.id] = size
                return True
            self.blocks.reused_blocks -= len(self.blocks.table(seq.id))  # not reused after all
            self.blocks.release(seq.id)
            seq.computed = 0
            return False

        while len(self.running) < self.max_running and budget > 0:
            if self.preempted:
                seq: Sequence | None = self.preempted[0] if accept(self.preempted[0]) else None
                if seq is not None:
                    self.preempted.popleft()
            else:
                seq = take(accept)
            if seq is None:
                break
            bisect.insort(self.running, seq, key=lambda s: s.id)
            scheduled[seq.id] = self._work(seq, sizes[seq.id])
            budget -= sizes[seq.id]
            admitted.append(seq)
        return admitted

    def _work(self, seq: Sequence, size: int) -> Work:
        start = seq.computed
        samples = start + size == len(seq.tokens)
        return Work(seq, start, seq.tokens[start : start + size], list(self.blocks.table(seq.id)), samples)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.id)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        bisect.insort(self.preempted, seq, key=lambda s: s.id)
