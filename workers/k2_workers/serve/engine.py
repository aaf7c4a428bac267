"""One rank of an expert-parallel serving group, decoding in lockstep with the others.

The engine composes the parts: rank 0 queues requests (`scheduler`), sends each batch and each new placement to
the other ranks (`wire`), and every rank decodes the same batch (`generate_batch`: prompts prefilled one by one,
then one forward per step for all) or applies the same placement (`resharding`), while `load` counts the tokens its
experts receive. Attention is replicated, the routed experts are sharded by the placement in force, and tokens
reach their experts through all-to-all (k2_workers.parallel). A placement is applied between two batches; the
requests that arrive meanwhile wait in the queue instead of failing. Greedy output does not depend on the
placement.

A multi-rank group is in lockstep or broken: when a collective fails on a rank (a peer died, timed out, or a step
raised), that rank marks the group broken for good (`broken`; its /healthz turns 503) and its process must exit, so
that the group's pods restart together (`k2_workers.serve.rank`). While the group is idle, rank 0 sends a heartbeat
now and then, so the followers' wait for the next message never reaches the collective timeout.

Tokens leave as they are decoded: each request has a `TokenStream` that rank 0 fills step by step. Rank 0 samples,
and sends every step's tokens with the rows that stay (`RankWire.share_step`): a row leaves the batch after its own
`max_new_tokens`, after EOS, or when its caller stopped reading (a client gone, a deadline passed), and the batch
ends when no row is left. Every rank feeds rank 0's tokens and drops the same rows, so all ranks make the same
all-to-all calls even if floating-point noise would have made their samples differ. Each request samples with its
own seeded generator, so a completion does not depend on what else shared its batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from k2_workers.model import K2ForCausalLM, sample_next
from k2_workers.model.generate import Sampler, prefill_batch
from k2_workers.serve.load import LoadCounter
from k2_workers.serve.metrics import ExpertLoadCollector
from k2_workers.serve.placement import ActivePlacement, GroupShape, check_shape
from k2_workers.serve.request import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    GenerateParams,
    check_prompt_length,
)
from k2_workers.serve.resharding import ExpertWeights, Resharder
from k2_workers.serve.scheduler import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    BatchScheduler,
    Pending,
)
from k2_workers.serve.token_stream import TokenStream
from k2_workers.serve.wire import Batch, Heartbeat, RankWire, Stop
from k2_workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GroupBroken(RuntimeError):
    """The group lost its lockstep earlier (a collective failed): nothing runs on it any more."""


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # without the prompt, cut after EOS
    batch_size: int  # requests decoded together with this one, itself included
    placement_generation: int  # the placement in force while it was decoded


@dataclass(frozen=True)
class _Job:
    prompt_ids: list[int]
    params: GenerateParams
    stream: TokenStream


def sampler(params: GenerateParams, device: torch.device | str = "cpu") -> Sampler:
    """Greedy, or sampling with the request's own generator (seeded by `seed`) on the logits' `device`."""
    if params.temperature == 0:
        return sample_next
    generator = torch.Generator(device=device).manual_seed(params.seed)
    return functools.partial(
        sample_next, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator
    )


class GroupEngine:
    """A rank of a serving group. Rank 0 calls `generate`/`apply_placement`/`stop`; the other ranks `follow`."""

    def __init__(
        self,
        model: K2ForCausalLM,
        tokenizer: Tokenizer,
        weights: ExpertWeights,
        rank: int,
        world_size: int,
        collector: ExpertLoadCollector | None = None,
        on_applied: Callable[[int], None] | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        max_queue: int = DEFAULT_MAX_QUEUE,
        request_timeout_s: float | None = None,
        shape: GroupShape | None = None,
    ) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {prefill_chunk_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.request_timeout_s = request_timeout_s
        self.scheduler: BatchScheduler[_Job, Completion] = BatchScheduler(
            self._run_batch, max_batch_size, batch_wait_s, max_queue
        )
        self.device = model.lm_head.weight.device
        self._wire = RankWire(world_size, model.config.n_routed_experts, self.device)
        self._load = LoadCounter(model, rank, collector)
        self._resharder = Resharder(model, weights, rank, world_size, self._load.add_weight_bytes)
        self._on_applied = on_applied
        self._group_lock = threading.Lock()  # one group operation at a time: a batch or a placement change
        self._last_group_op = time.monotonic()
        self.shape = shape  # what a placement must fit, when known
        self.broken: str | None = None  # why the group lost its lockstep, once it has
        self.placement: ActivePlacement | None = None
        self.placement_error: str | None = None  # why the newest placement file is not applied, if it is not
        self.cancelled_requests = 0  # requests whose caller stopped reading before their end (queued or decoding)

    @property
    def generation(self) -> int | None:
        return None if self.placement is None else self.placement.generation

    @property
    def unready(self) -> str | None:
        """Why this rank cannot serve now (None when it can): no placement yet, a broken group, or stopping."""
        if self.broken is not None:
            return f"the group is broken: {self.broken}"
        if self.placement is None:
            return "no placement applied yet"
        if self.scheduler.stopping:
            return "the rank is stopping"
        return None

    # --- rank 0 --------------------------------------------------------------------------------------------------
    def apply_placement(self, placement: ActivePlacement) -> None:
        """Make `placement` the one in force on every rank of the group; a ValueError, before any other rank sees
        it, when it does not fit the group's shape."""
        if self.shape is not None:
            check_shape(placement, self.shape)
        with self._group_lock, self._collective():
            if self.placement is not None and placement.generation == self.placement.generation:
                return
            self._wire.send_placement(placement)
            self._apply(placement)

    def heartbeat(self, idle_s: float) -> None:
        """Tell the followers that rank 0 is alive, when no group operation ran for `idle_s` (and none runs)."""
        if self.world_size == 1 or self.broken is not None or not self._group_lock.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._last_group_op >= idle_s:
                with self._collective():
                    self._wire.send_heartbeat()
        except Exception:  # the group is marked broken; rank 0's loop sees it and exits
            pass
        finally:
            self._group_lock.release()

    def generate(
        self, prompt_ids: list[int], params: GenerateParams, cancelled: Callable[[], bool] | None = None
    ) -> Completion:
        """The completion of one prompt (`stream`'s tokens, all of them), once its row left the batch."""
        stream = self.stream(prompt_ids, params, cancelled)
        tokens = list(stream)
        return Completion(tokens, stream.batch_size, stream.placement_generation)

    def stream(
        self,
        prompt_ids: list[int],
        params: GenerateParams,
        cancelled: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
    ) -> TokenStream:
        """The tokens of one prompt as they are decoded (cut after EOS). Thread-safe: the request waits in the
        queue, then decodes in a batch with the others queued at the time. Raises here a ValueError for a bad
        prompt, `QueueFull`, `Stopping`; while iterating, a RuntimeError when the batch failed,
        `DeadlineExceeded` past `request_timeout_s` (or the caller's shorter `timeout_s`), and `Cancelled` once
        `cancelled()` turns true. Leaving the
        iteration early takes the request out of the queue, or its row out of the batch at the next step."""
        if self.placement is None:
            raise RuntimeError("no placement applied yet")
        if not prompt_ids:  # refused here, before any other rank sees it
            raise ValueError("prompt: must encode to at least one token")
        positions = self.model.config.max_position_embeddings
        check_prompt_length(len(prompt_ids), params.max_new_tokens, self.max_prompt_tokens, positions)
        pending: Pending[_Job, Completion] | None = None

        def dequeue() -> bool:
            return pending is not None and self.scheduler.dequeue(pending)

        timeouts = [t for t in (self.request_timeout_s, timeout_s) if t is not None]
        stream = TokenStream(min(timeouts, default=None), cancelled, dequeue, self._count_cancelled)
        pending = self.scheduler.enqueue(_Job(prompt_ids, params, stream))
        return stream

    def _count_cancelled(self) -> None:
        self.cancelled_requests += 1  # only ever read as a count: a lost update under a race is harmless

    def stop(self) -> None:
        """Finish the queued requests, then release the other ranks (unless the group is broken)."""
        self.scheduler.stop()
        with self._group_lock:
            if self.broken is None:
                with self._collective():
                    self._wire.send_stop()

    def _run_batch(self, jobs: list[_Job]) -> list[Completion]:
        """Decode `jobs` on every rank (the scheduler's batch function); their streams get the tokens meanwhile."""
        streams = [j.stream for j in jobs]
        try:
            with self._group_lock, self._collective():
                assert self.placement is not None
                generation = self.placement.generation
                for stream in streams:
                    stream.begin(len(jobs), generation)
                prompts, params = [j.prompt_ids for j in jobs], [j.params for j in jobs]
                batch = self._wire.send_batch(prompts, params, self.prefill_chunk_tokens)
                completions = self._decode(batch, streams)
        except BaseException as error:  # every caller must wake up; a stream that ended already reads no more
            for stream in streams:
                stream.end(error)
            raise
        return [Completion(tokens, len(jobs), generation) for tokens in completions]

    # --- ranks > 0 -----------------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Run what rank 0 sends until it says stop. Raises when a collective or a step fails (rank 0 or a peer
        gone, or an error here): the group is then broken and this process must exit."""
        while True:
            with self._collective():
                message = self._wire.receive()
                if isinstance(message, Stop):
                    return
                if isinstance(message, Batch):
                    self._decode(message, None)
                elif not isinstance(message, Heartbeat):
                    self._apply(message)

    # --- every rank ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """A group operation (the group lock held on rank 0): refused once the group is broken; in a multi-rank
        group any failure inside breaks it, since the ranks may no longer agree on the next collective."""
        if self.broken is not None:
            raise GroupBroken(f"the group is broken: {self.broken}")
        try:
            yield
        except Exception as error:
            if self.world_size > 1:
                self.broken = f"{type(error).__name__}: {error}"
                log.error("rank %d: the group is broken: %s", self.rank, self.broken)
            raise
        finally:
            self._last_group_op = time.monotonic()

    def _apply(self, placement: ActivePlacement) -> None:
        self._resharder.apply(self.placement, placement)
        self.placement = placement
        self._load.reset_slots(placement.slots_per_rank)
        log.info("rank %d applied placement generation %d", self.rank, placement.generation)
        if self._on_applied is not None:
            self._on_applied(placement.generation)

    @torch.no_grad()
    def _decode(self, batch: Batch, streams: list[TokenStream] | None) -> list[list[int]]:
        """The batch's completions, each cut after its `max_new_tokens` or EOS. Rank 0 (with the `streams`) samples
        each step and decides which rows stay; the followers (`streams` None) take its decisions."""
        max_new_tokens = max(p.max_new_tokens for p in batch.params)
        cache, logits_BV = prefill_batch(self.model, batch.prompts, max_new_tokens, prefill_chunk=batch.prefill_chunk)
        samplers = [sampler(p, self.device) for p in batch.params] if streams is not None else []
        rows = list(range(len(batch.prompts)))  # the batch index of each row still decoding
        tokens: list[list[int]] = [[] for _ in rows]
        while True:
            if streams is not None:
                next_B = torch.cat([samplers[r](logits_BV[i : i + 1]) for i, r in enumerate(rows)])
                sampled = zip(rows, next_B.tolist(), strict=True)
                keep = [self._stays(batch.params[r], tokens[r], token, streams[r]) for r, token in sampled]
                step_2B = torch.stack([next_B, torch.tensor(keep, dtype=torch.long, device=next_B.device)])
            else:
                step_2B = torch.zeros(2, len(rows), dtype=torch.long, device=self.device)
            step_2B = self._wire.share_step(step_2B)
            kept = [i for i, stays in enumerate(step_2B[1].tolist()) if stays]
            for i, (row, token) in enumerate(zip(rows, step_2B[0].tolist(), strict=True)):
                tokens[row].append(token)
                if streams is not None:
                    streams[row].put(token)
                    if i not in kept:
                        streams[row].end()
            if not kept:
                break
            next_B = step_2B[0]
            if len(kept) < len(rows):  # finished or cancelled rows leave the batch
                index = torch.tensor(kept, device=next_B.device)
                cache.keep_rows(index)
                next_B, rows = next_B[index], [rows[i] for i in kept]
            logits_BV = self.model(next_B[:, None], cache=cache).logits[:, -1]
        self._load.flush()
        return tokens

    def _stays(self, params: GenerateParams, tokens: list[int], token: int, stream: TokenStream) -> bool:
        """Whether a row decodes another token after `token` (not yet in `tokens`)."""
        return len(tokens) + 1 < params.max_new_tokens and token != self.tokenizer.eos_id and stream.wanted
