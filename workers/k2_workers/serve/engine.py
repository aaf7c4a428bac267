"""One rank of an expert-parallel serving group, decoding a continuous batch in lockstep with the others.

The engine composes the parts. Rank 0 queues requests (`step_loop`), decides every step of the continuous batch
(`batcher`: which sequences run, their prefill chunks, preemption; `blocks`: which cache blocks they hold, prefix
sharing), sends each step and each new placement to the other ranks (`wire`), and every rank runs the same step on
its own copy of the paged latent cache (`step_runner`, `k2_workers.model.paged_cache`) or applies the same placement
(`resharding`), while `load` counts the tokens its experts receive. Attention is replicated, the routed experts are
sharded by the placement in force, and tokens reach their experts through all-to-all (k2_workers.parallel).

Requests join the running batch at the next step and leave it as soon as they end, so nobody waits for a whole
batch. A placement change is one group operation like a step (`GroupLock`, granted in arrival order): it applies
between two steps, and the running requests go on with the new placement at the next step; greedy output does not
depend on the placement.

A multi-rank group is in lockstep or broken: when a collective fails on a rank (a peer died, timed out, or a step
raised), that rank marks the group broken for good (`broken`; its /healthz turns 503) and its process must exit, so
that the group's pods restart together (`k2_workers.serve.rank`). While the group is idle, rank 0 sends a heartbeat
now and then, so the followers' wait for the next message never reaches the collective timeout.

Tokens leave as they are decoded: each request has a `TokenStream` that rank 0 fills step by step. Only rank 0
samples: each step it sends carries the tokens sampled at the step before, so the followers feed the same tokens.
A row leaves after its own `max_new_tokens`, after EOS, or when its caller stopped reading (a client gone, a
deadline passed), and its cache blocks are free for the next step. Each request samples with its own seeded
generator, so a completion does not depend on what else shared its batch.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from k2_workers.model import K2ForCausalLM, sample_next
from k2_workers.model.decoding import Sampler
from k2_workers.model.paged_cache import PagedPool
from k2_workers.serve.batcher import Batcher, Sequence, StepPlan
from k2_workers.serve.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_TOKENS, BlockManager
from k2_workers.serve.latency import LatencyStats
from k2_workers.serve.load import LoadCounter
from k2_workers.serve.metrics import ExpertLoadCollector
from k2_workers.serve.placement import ActivePlacement, GroupShape, check_shape
from k2_workers.serve.request import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    GenerateParams,
    RequestError,
    check_prompt_length,
)
from k2_workers.serve.resharding import ExpertWeights, Resharder
from k2_workers.serve.scheduler import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from k2_workers.serve.step_loop import GroupLock, StepLoop
from k2_workers.serve.step_runner import run_step
from k2_workers.serve.token_stream import TokenStream
from k2_workers.serve.wire import Heartbeat, RankWire, Step, Stop
from k2_workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class GroupBroken(RuntimeError):
    """The group lost its lockstep earlier (a collective failed): nothing runs on it any more."""


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # without the prompt, cut after EOS
    batch_size: int  # sequences in the running batch when it joined, itself included
    placement_generation: int  # the placement in force while it was decoded


@dataclass(eq=False)
class _Job:
    seq: Sequence
    params: GenerateParams
    stream: TokenStream
    sample: Sampler | None = None  # made when it first joins the batch
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    sent: int = 0  # tokens put into its stream


def sampler(params: GenerateParams, device: torch.device | str = "cpu") -> Sampler:
    """Greedy, or sampling with the request's own generator (seeded by `seed`) on the logits' `device`."""
    if params.temperature == 0:
        return sample_next
    generator = torch.Generator(device=device).manual_seed(params.seed)
    return functools.partial(
        sample_next, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator
    )


class GroupEngine:
    """A rank of a serving group. Rank 0 calls `generate`/`stream`/`apply_placement`/`stop`; the others `follow`.

    `max_batch_size` bounds the running sequences, `max_step_tokens` the tokens of one step (default: a prefill
    chunk plus a token per running sequence), `cache_tokens` the paged cache (in tokens, `block_size` per block)."""

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
        cache_tokens: int = DEFAULT_CACHE_TOKENS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_step_tokens: int | None = None,
    ) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens: must be >= 1, got {prefill_chunk_tokens}")
        if block_size < 1 or cache_tokens < block_size:
            raise ValueError(f"cache_tokens: must hold at least one block of {block_size}, got {cache_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.request_timeout_s = request_timeout_s
        self.device = model.lm_head.weight.device
        self.blocks = BlockManager(cache_tokens // block_size, block_size)
        step_tokens = max_step_tokens if max_step_tokens is not None else prefill_chunk_tokens + max_batch_size
        self.batcher = Batcher(self.blocks, max_batch_size, step_tokens, prefill_chunk_tokens)
        self.scheduler: StepLoop[Sequence] = StepLoop(
            self._step,
            lambda: self.batcher.busy,
            lambda: len(self.batcher.running),
            lambda: len(self.batcher.preempted),
            max_batch_size,
            batch_wait_s,
            max_queue,
        )
        self._pool = self._new_pool(self.blocks.num_blocks, block_size)
        self._jobs: dict[int, _Job] = {}
        self._ids = itertools.count()
        self._wire = RankWire(world_size, model.config.n_routed_experts, self.device)
        self._load = LoadCounter(model, rank, collector)
        self._resharder = Resharder(model, weights, rank, world_size, self._load.add_weight_bytes)
        self._on_applied = on_applied
        self._group_lock = GroupLock()  # one group operation at a time, in arrival order: a step or a placement
        self._last_group_op = time.monotonic()
        self.shape = shape  # what a placement must fit, when known
        self.broken: str | None = None  # why the group lost its lockstep, once it has
        self.placement: ActivePlacement | None = None
        self.placement_error: str | None = None  # why the newest placement file is not applied, if it is not
        self.cancelled_requests = 0  # requests whose caller stopped reading before their end (queued or decoding)
        self.steps = 0  # steps of the continuous batch run so far (rank 0)
        self.latency = LatencyStats()

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
        """Make `placement` the one in force on every rank of the group, between two steps; a ValueError, before
        any other rank sees it, when it does not fit the group's shape."""
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
        queue, then joins the running batch at the next step it fits. Raises here a ValueError for a bad prompt
        (one that would not fit the cache alone included), `QueueFull`, `Stopping`; while iterating, a
        RuntimeError when a step failed, `DeadlineExceeded` past `request_timeout_s` (or the caller's shorter
        `timeout_s`), and `Cancelled` once `cancelled()` turns true. Leaving the iteration early takes the request
        out of the queue, or its row out of the batch at the next step."""
        if self.placement is None:
            raise RuntimeError("no placement applied yet")
        if not prompt_ids:  # refused here, before any other rank sees it
            raise ValueError("prompt: must encode to at least one token")
        positions = self.model.config.max_position_embeddings
        check_prompt_length(len(prompt_ids), params.max_new_tokens, self.max_prompt_tokens, positions)
        if not self.batcher.fits(len(prompt_ids) + params.max_new_tokens):
            raise RequestError(
                f"prompt: {len(prompt_ids)} tokens + max_new_tokens {params.max_new_tokens} do not fit the"
                f" cache of {self.blocks.capacity_tokens} tokens"
            )
        seq = Sequence(next(self._ids), list(prompt_ids), params.max_new_tokens)

        def dequeue() -> bool:
            if self.scheduler.dequeue(seq):
                self._jobs.pop(seq.id, None)
                return True
            return False

        timeouts = [t for t in (self.request_timeout_s, timeout_s) if t is not None]
        stream = TokenStream(min(timeouts, default=None), cancelled, dequeue, self._count_cancelled)
        self._jobs[seq.id] = _Job(seq, params, stream)
        try:
            self.scheduler.enqueue(seq)
        except BaseException:
            self._jobs.pop(seq.id, None)
            raise
        return stream

    def _count_cancelled(self) -> None:
        self.cancelled_requests += 1  # only ever read as a count: a lost update under a race is harmless

    def stop(self) -> None:
        """Finish the queued and running requests, then release the other ranks (unless the group is broken)."""
        self.scheduler.stop()
        with self._group_lock:
            if self.broken is None:
                with self._collective():
                    self._wire.send_stop()

    def _step(self) -> bool:
        """One step of the continuous batch (the decoding thread): drop the rows nobody reads, plan, run the step
        on every rank, hand out the sampled tokens. False when there was nothing to run."""
        preempted = list(self.batcher.preempted)
        for seq in [*self.batcher.running, *preempted]:
            job = self._jobs[seq.id]
            # A decoding row was kept by its last sample (`_stays`): it runs this step and leaves after it, the
            # others (prefilling or preempted) leave now.
            if not job.stream.wanted and (seq.pending > 1 or seq in preempted):
                self._leave(job)
        plan = self.batcher.plan(self.scheduler.take_first)
        for seq in plan.admitted:
            job = self._jobs[seq.id]
            if job.sample is None:
                job.sample = sampler(job.params, self.device)
                assert self.placement is not None
                job.stream.begin(len(self.batcher.running), self.placement.generation)
        if not plan.work:
            return False
        step = Step(
            [w.start for w in plan.work],
            [w.tokens for w in plan.work],
            [w.blocks for w in plan.work],
            self.blocks.num_blocks,
            self.blocks.block_size,
        )
        try:
            with self._group_lock, self._collective():
                self._wire.send_step(step)
                logits_WV = run_step(self.model, self._pool, step)
                self._load.flush()
        except BaseException as error:  # every caller must wake up; a stream that ended already reads no more
            failure = error
            if self.broken is not None and not isinstance(error, GroupBroken):  # it broke during this step
                failure = GroupBroken(f"the group broke while the request ran, before its answer: {self.broken}")
                failure.__cause__ = error
            for seq in [*self.batcher.running, *self.batcher.preempted]:
                job = self._jobs[seq.id]
                self._leave(job, failure)
            raise
        self._hand_out(plan, logits_WV)
        self.steps += 1
        return True

    def _hand_out(self, plan: StepPlan, logits_WV: torch.Tensor) -> None:
        """Commit the step, sample each row that reached its end, and let finished rows leave.

        The greedy rows take one argmax over the whole step and one copy to the host, not an `.item()` (on a GPU a
        device sync) per row. On the CPU benchmark this changes no throughput: the time moved to waking the rows'
        readers (`TokenStream.put`), which then contend for the interpreter."""
        self.batcher.commit(plan)
        sampled = [(index, work, self._jobs[work.seq.id]) for index, work in enumerate(plan.work) if work.samples]
        greedy_W = logits_WV.argmax(dim=-1).tolist()
        for index, work, job in sampled:
            assert job.sample is not None
            if job.params.temperature == 0:
                token = int(greedy_W[index])
            else:
                token = int(job.sample(logits_WV[index : index + 1]).item())
            job.stream.put(token)
            job.sent += 1
            if job.sent == 1:
                job.first_token_at = time.monotonic()
                self.latency.first_token(job.first_token_at - job.arrived)
            if self._stays(job, token):
                work.seq.tokens.append(token)
            else:
                self._leave(job)

    def _leave(self, job: _Job, error: BaseException | None = None) -> None:
        """The request's row leaves the batch: its blocks are free at once, its stream ends."""
        self.batcher.finish(job.seq)
        self._jobs.pop(job.seq.id, None)
        job.stream.end(error)
        if error is None and job.sent:
            self.latency.finished(time.monotonic() - job.first_token_at, job.sent)

    def _stays(self, job: _Job, token: int) -> bool:
        """Whether a row decodes another token after `token` (not yet in its tokens)."""
        generated = job.seq.generated + 1
        return generated < job.params.max_new_tokens and token != self.tokenizer.eos_id and job.stream.wanted

    # --- ranks > 0 -----------------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Run what rank 0 sends until it says stop. Raises when a collective or a step fails (rank 0 or a peer
        gone, or an error here): the group is then broken and this process must exit."""
        while True:
            with self._collective():
                message = self._wire.receive()
                if isinstance(message, Stop):
                    return
                if isinstance(message, Step):
                    if (self._pool.num_blocks, self._pool.block_size) != (message.num_blocks, message.block_size):
                        self._pool = self._new_pool(message.num_blocks, message.block_size)  # rank 0's cache shape
                    run_step(self.model, self._pool, message)
                    self._load.flush()
                elif not isinstance(message, Heartbeat):
                    self._apply(message)

    # --- every rank ----------------------------------------------------------------------------------------------
    def _new_pool(self, num_blocks: int, block_size: int) -> PagedPool:
        dtype = self.model.lm_head.weight.dtype
        return PagedPool(self.model.config, num_blocks, block_size, device=self.device, dtype=dtype)

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
