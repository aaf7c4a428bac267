"""One expert-parallel group of serving ranks running in lockstep.

Rank 0 owns the HTTP endpoint. Requests queue, and one decoding thread takes up to `max_batch_size` of them as one
batch, after waiting `batch_wait_s` for requests already on their way (callers that come back together then share
a batch; one thread also keeps the CPU kernels on one OpenMP team instead of one per HTTP thread). Rank 0
broadcasts a small header, each request's parameters and the prompts, and every rank runs the same batched decoding
loop (`generate_batch`: prompts prefilled one by one, then one forward per step for all). Attention is replicated,
the routed experts are sharded by the placement in force, and tokens reach their experts through all-to-all
(k2_workers.parallel). A new placement generation is applied between two batches: rank 0 broadcasts the slot
tables; each rank keeps the experts it already holds, receives the ones another rank held from that rank
(`expert_moves`, `expert_exchange`) and reads only the rest from storage; the requests that arrive meanwhile wait in
the queue instead of failing. Greedy output does not depend on the placement.

Every rank decodes exactly the batch's largest `max_new_tokens` steps (each completion is cut to its own length and
after EOS on rank 0) so that all ranks make the same number of all-to-all calls even if floating-point noise made
their samples differ. Each request samples with its own seeded generator, so a completion does not depend on what
else shared its batch.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from k2_workers.model import K2ForCausalLM
from k2_workers.model.generate import Sampler, generate_batch, sample_next
from k2_workers.model.moe import MoE
from k2_workers.parallel import ExpertParallelExperts, SlotTable
from k2_workers.serve.expert_exchange import ExpertTriple, exchange_experts
from k2_workers.serve.expert_moves import plan_expert_moves
from k2_workers.serve.expert_weights import ExpertWeights
from k2_workers.serve.metrics import ExpertLoadCollector
from k2_workers.serve.placement import ActivePlacement
from k2_workers.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Op(enum.IntEnum):
    STOP = 0
    GENERATE = 1
    APPLY_PLACEMENT = 2


HEADER_LEN = 5  # op, then: generation and table shape (APPLY_PLACEMENT) | batch size and total prompt tokens
PARAMS_LEN = 5  # per request: prompt length, max_new_tokens, temperature in micro-units, seed, top_k (0 = off)
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.002


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    top_k: int | None = None

    def as_row(self, prompt_len: int) -> list[int]:
        temperature = round(self.temperature * 1_000_000)
        return [prompt_len, self.max_new_tokens, temperature, self.seed, self.top_k or 0]

    @classmethod
    def from_row(cls, row: list[int]) -> GenerateParams:
        _, max_new_tokens, temperature, seed, top_k = row
        return cls(max_new_tokens, temperature / 1_000_000, seed, top_k or None)

    def sampler(self) -> Sampler:
        """Greedy, or sampling with this request's own generator (seeded by `seed`)."""
        if self.temperature == 0:
            return sample_next
        generator = torch.Generator().manual_seed(self.seed)
        return functools.partial(sample_next, temperature=self.temperature, top_k=self.top_k, generator=generator)


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # without the prompt, cut after EOS
    batch_size: int  # requests decoded together with this one, itself included
    placement_generation: int  # the placement in force while it was decoded


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerateParams
    done: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None
    error: BaseException | None = None


class GroupEngine:
    """A rank of a serving group. Rank 0 calls `generate`/`apply_placement`; the other ranks call `follow`."""

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
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s: must be >= 0, got {batch_wait_s}")
        self.model = model.eval()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: list[_Request] = []
        self._queue_changed = threading.Condition()
        self._stopping = False
        self._batch_thread: threading.Thread | None = None
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self._weights = weights
        self._collector = collector
        self._on_applied = on_applied
        self._lock = threading.Lock()
        self.placement: ActivePlacement | None = None
        self.placement_error: str | None = None  # why the newest placement file is not applied, if it is not
        num_layers = len(list(model.moe_blocks()))
        self._expert_tokens_LE = np.zeros((num_layers, model.config.n_routed_experts))
        self._slot_tokens_LS: np.ndarray | None = None
        for index, moe in enumerate(model.moe_blocks()):
            moe.register_forward_hook(self._count_hook(index))

    # --- rank 0 --------------------------------------------------------------------------------------------------
    @property
    def generation(self) -> int | None:
        return None if self.placement is None else self.placement.generation

    def apply_placement(self, placement: ActivePlacement) -> None:
        """Make `placement` the one in force on every rank of the group (called on rank 0)."""
        with self._lock:
            if self.placement is not None and placement.generation == self.placement.generation:
                return
            tables = placement.as_tensor()
            self._broadcast_header(Op.APPLY_PLACEMENT, placement.generation, list(tables.shape))
            self._broadcast(tables)
            self._apply(placement)

    def generate(self, prompt_ids: list[int], params: GenerateParams) -> Completion:
        """The completion of one prompt. Thread-safe: callers wait while the decoding thread runs their request in
        a batch with the others queued at the time; a failed batch raises its error in each of its callers."""
        if self.placement is None:
            raise RuntimeError("no placement applied yet")
        if not prompt_ids:  # refused here, before any other rank sees it
            raise ValueError("prompt: must encode to at least one token")
        request = _Request(prompt_ids, params)
        with self._queue_changed:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._queue.append(request)
            if self._batch_thread is None:
                self._batch_thread = threading.Thread(target=self._batch_loop, name="decode", daemon=True)
                self._batch_thread.start()
            self._queue_changed.notify()
        request.done.wait()
        if request.error is not None:  # a server-side failure, whatever its type (a ValueError would read as 400)
            raise RuntimeError(f"decoding failed: {request.error}") from request.error
        assert request.completion is not None
        return request.completion

    def _batch_loop(self) -> None:
        """The decoding thread: batches until `stop`, then drains the queue."""
        while True:
            with self._queue_changed:
                self._queue_changed.wait_for(lambda: bool(self._queue) or self._stopping)
                if not self._queue:
                    return
            time.sleep(self.batch_wait_s)  # requests on their way (clients coming back together) join this batch
            with self._queue_changed:
                batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
            with self._lock:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Request]) -> None:
        """Decode `batch` on every rank and hand each request its completion (or the error)."""
        try:
            rows = torch.tensor([r.params.as_row(len(r.prompt_ids)) for r in batch], dtype=torch.long)
            prompts = torch.tensor([t for r in batch for t in r.prompt_ids], dtype=torch.long)
            self._broadcast_header(Op.GENERATE, len(batch), [prompts.numel()])
            self._broadcast(rows)
            self._broadcast(prompts)
            completions = self._decode(rows, prompts)
        except BaseException as error:  # every caller must wake up, whatever happened
            for request in batch:
                request.error = error
                request.done.set()
            if not isinstance(error, Exception):
                raise
            log.exception("a batch of %d requests failed", len(batch))
            return
        eos = self.tokenizer.eos_id
        assert self.placement is not None
        for request, tokens in zip(batch, completions, strict=True):
            tokens = tokens[: request.params.max_new_tokens]
            tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
            request.completion = Completion(tokens, len(batch), self.placement.generation)
            request.done.set()

    def stop(self) -> None:
        """Finish the queued requests, then release the other ranks (called on rank 0)."""
        with self._queue_changed:
            self._stopping = True
            self._queue_changed.notify_all()
        if self._batch_thread is not None:
            self._batch_thread.join()
        with self._lock:
            self._broadcast_header(Op.STOP, 0, [])

    # --- ranks > 0 -----------------------------------------------------------------------------------------------
    def follow(self) -> None:
        """Run what rank 0 broadcasts until it says stop."""
        while True:
            header = torch.zeros(HEADER_LEN, dtype=torch.long)
            dist.broadcast(header, src=0)
            op, arg, *rest = header.tolist()
            if op == Op.STOP:
                return
            if op == Op.APPLY_PLACEMENT:
                tables = torch.zeros(rest[:3], dtype=torch.long)
                dist.broadcast(tables, src=0)
                self._apply(ActivePlacement.from_tensor(arg, tables, self.model.config.n_routed_experts))
            elif op == Op.GENERATE:
                rows = torch.zeros(arg, PARAMS_LEN, dtype=torch.long)
                dist.broadcast(rows, src=0)
                prompts = torch.zeros(rest[0], dtype=torch.long)
                dist.broadcast(prompts, src=0)
                self._decode(rows, prompts)

    # --- every rank ----------------------------------------------------------------------------------------------
    def _apply(self, placement: ActivePlacement) -> None:
        blocks = list(self.model.moe_blocks())
        if len(placement.tables) != len(blocks):
            raise ValueError(f"placement has {len(placement.tables)} layers, the model {len(blocks)} MoE layers")
        if placement.num_ranks != self.world_size:
            raise ValueError(f"placement has {placement.num_ranks} ranks, this group {self.world_size}")
        for index, (moe, table) in enumerate(zip(blocks, placement.tables, strict=True)):
            moe.experts = self._reshard_layer(index, moe.experts, table)
        self.placement = placement
        self._slot_tokens_LS = np.zeros((len(blocks), placement.slots_per_rank))
        log.info("rank %d applied placement generation %d", self.rank, placement.generation)
        if self._on_applied is not None:
            self._on_applied(placement.generation)

    def _reshard_layer(self, index: int, current: nn.Module, table: SlotTable) -> ExpertParallelExperts:
        """This rank's shard of one MoE layer under `table`. Experts it already holds are reused, experts another
        rank held under the previous table arrive from that rank, and only the rest are read from storage."""
        wanted = table.table_RS[self.rank].tolist()
        config = self.model.config
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        dtype = self.model.lm_head.weight.dtype
        sources: dict[int, ExpertTriple] = {}
        if isinstance(current, ExpertParallelExperts) and self.placement is not None:
            gate, up, down = (current.gate_proj.detach(), current.up_proj.detach(), current.down_proj.detach())
            for slot, expert in enumerate(current.expert_ids):
                sources.setdefault(expert, (gate[slot], up[slot], down[slot]))
            moves = plan_expert_moves(self.placement.tables[index], table)  # every rank takes part, even if unchanged
            received = exchange_experts(moves, self.rank, sources.__getitem__, inter, hidden, gate)
            self._count_bytes("peer", received.values())
            sources.update(received)
        missing = [e for e in dict.fromkeys(wanted) if e not in sources]
        if missing:
            stacked = [w.to(dtype) for w in self._weights.experts(index, missing)]
            loaded = {e: (stacked[0][i], stacked[1][i], stacked[2][i]) for i, e in enumerate(missing)}
            self._count_bytes("storage", loaded.values())
            sources.update(loaded)
        gate, up, down = (torch.stack([sources[e][p] for e in wanted]) for p in range(3))
        return ExpertParallelExperts.from_weights(table, self.rank, gate, up, down)

    def _count_bytes(self, source: str, experts: Iterable[ExpertTriple]) -> None:
        nbytes = sum(w.numel() * w.element_size() for triple in experts for w in triple)
        if self._collector is not None and nbytes:
            self._collector.add_weight_bytes(source, nbytes)

    @torch.no_grad()
    def _decode(self, rows: torch.Tensor, prompts: torch.Tensor) -> list[list[int]]:
        """The batch's completions, each `max_new_tokens` of the batch long: [B, PARAMS_LEN] rows, flat prompts."""
        params = [GenerateParams.from_row(row) for row in rows.tolist()]
        lengths = rows[:, 0].tolist()
        max_new_tokens = max(p.max_new_tokens for p in params)
        samplers = [p.sampler() for p in params]
        completions = generate_batch(self.model, list(torch.split(prompts, lengths)), max_new_tokens, samplers)
        self._flush_counts()
        return [c.tolist() for c in completions]

    def _count_hook(self, index: int) -> Callable[..., None]:
        def hook(module: MoE, args: object, output: object) -> None:
            if self.rank == 0:  # rank 0 routes the group's tokens; the others route the same tokens again
                self._expert_tokens_LE[index] += module.last_tokens_per_expert_E.numpy()
            experts = module.experts
            if self._slot_tokens_LS is not None and isinstance(experts, ExpertParallelExperts):
                self._slot_tokens_LS[index] += experts.last_tokens_per_slot_S.numpy()

        return hook

    def _flush_counts(self) -> None:
        if self._collector is not None and self._slot_tokens_LS is not None:
            self._collector.add(self._expert_tokens_LE, self._slot_tokens_LS)
        self._expert_tokens_LE[:] = 0
        if self._slot_tokens_LS is not None:
            self._slot_tokens_LS[:] = 0

    def _broadcast_header(self, op: Op, arg: int, rest: list[int]) -> None:
        if self.world_size > 1:
            header = torch.zeros(HEADER_LEN, dtype=torch.long)
            header[: 2 + len(rest)] = torch.tensor([int(op), arg, *rest])
            dist.broadcast(header, src=0)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
