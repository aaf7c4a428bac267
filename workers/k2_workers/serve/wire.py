"""What rank 0 of a serving group broadcasts to the other ranks, and how they read it.

Every message starts with a header of `HEADER_LEN` int64: the op, then
- `GENERATE`: the batch size B, the total prompt tokens N and the prefill chunk (tokens per prefill forward: it
  sets how many all-to-all calls a prefill makes, so every rank uses rank 0's), followed by B rows of `PARAMS_LEN`
  int64 (prompt length, max_new_tokens, temperature in micro-units, seed, top_k with 0 for off, top_p in
  micro-units with 0 for off) and the N prompt ids, concatenated;
- `STEP`: one iteration of the continuous batch (`Step`): the row count W, the total tokens N, the total block-table
  entries M, and the pool's block count and block size, followed by W rows of (start position, tokens, blocks),
  the N tokens and the M block ids, concatenated; every rank runs the same forwards on its own copy of the paged
  cache (attention is replicated), so the followers need no scheduler of their own;
- `APPLY_PLACEMENT`: the generation and the table shape [layers, ranks, slots], followed by the slot tables;
- `STOP`: nothing; the followers return.
- `HEARTBEAT`: nothing; rank 0 sends it while the group is idle, so the followers' wait for the next message never
  reaches the collective timeout.

While a batch decodes, rank 0 also sends every step (`share_step`): the tokens it sampled and which rows stay, so
that every rank feeds the same tokens and drops the same rows (a finished or cancelled request) at the same step.

Rank 0 decodes the batch from its wire form too (`send_batch` returns it), so every rank runs exactly the same
parameters (a temperature rounded to micro-units included). A one-rank group sends nothing. Every tensor is made on
the wire's `device` (the GPU under nccl, which takes no CPU tensors); slot tables come back to the CPU.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from k2_workers.parallel import SlotTable
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams

HEADER_LEN = 6
PARAMS_LEN = 6
TEMPERATURE_SCALE = 1_000_000  # temperatures and top_p travel as integers in micro-units


class Op(enum.IntEnum):
    STOP = 0
    GENERATE = 1
    APPLY_PLACEMENT = 2
    HEARTBEAT = 3
    STEP = 4


@dataclass(frozen=True)
class Batch:
    """Requests decoded together: `prompts[i]` (1-D int64 token ids) with `params[i]`."""

    prompts: list[Tensor]
    params: list[GenerateParams]
    prefill_chunk: int


@dataclass(frozen=True)
class Step:
    """One iteration of the continuous batch: row i feeds `tokens[i]` at positions `starts[i]`.. of a sequence whose
    cache blocks are `tables[i]`, in a pool of `num_blocks` blocks of `block_size` tokens."""

    starts: list[int]
    tokens: list[list[int]]
    tables: list[list[int]]
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class Stop:
    """Rank 0 is shutting down."""


@dataclass(frozen=True)
class Heartbeat:
    """Rank 0 is alive; nothing to run."""


Message = Batch | Step | ActivePlacement | Stop | Heartbeat


def params_row(params: GenerateParams, prompt_len: int) -> list[int]:
    temperature = round(params.temperature * TEMPERATURE_SCALE)
    top_p = round((params.top_p or 0) * TEMPERATURE_SCALE)
    return [prompt_len, params.max_new_tokens, temperature, params.seed, params.top_k or 0, top_p]


def params_from_row(row: Sequence[int]) -> tuple[int, GenerateParams]:
    """(prompt length, parameters) of one row."""
    prompt_len, max_new_tokens, temperature, seed, top_k, top_p = row
    scale = TEMPERATURE_SCALE
    return prompt_len, GenerateParams(max_new_tokens, temperature / scale, seed, top_k or None, top_p / scale or None)


def decode_batch(rows_BP: Tensor, prompts_N: Tensor, prefill_chunk: int) -> Batch:
    """The batch of [B, PARAMS_LEN] parameter rows and the flat prompt ids."""
    decoded = [params_from_row(row) for row in rows_BP.tolist()]
    prompts = list(torch.split(prompts_N, [length for length, _ in decoded]))
    return Batch(prompts, [params for _, params in decoded], prefill_chunk)


def decode_step(rows_W3: Tensor, tokens_N: Tensor, blocks_M: Tensor, num_blocks: int, block_size: int) -> Step:
    """The step of [W, 3] rows (start, tokens, blocks) and the flat tokens and block ids."""
    rows = rows_W3.tolist()
    tokens = [t.tolist() for t in torch.split(tokens_N.cpu(), [r[1] for r in rows])]
    tables = [t.tolist() for t in torch.split(blocks_M.cpu(), [r[2] for r in rows])]
    return Step([r[0] for r in rows], tokens, tables, num_blocks, block_size)


def placement_tables(placement: ActivePlacement) -> Tensor:
    """[layers, ranks, slots] int64."""
    return torch.stack([t.table_RS for t in placement.tables])


def placement_from_tables(generation: int, tables_LRS: Tensor, num_experts: int) -> ActivePlacement:
    return ActivePlacement(generation, tuple(SlotTable(t.cpu().clone(), num_experts) for t in tables_LRS.cpu()))


class RankWire:
    """Broadcasts from rank 0 over the default process group: rank 0 calls `send_*`, the other ranks `receive`."""

    def __init__(self, world_size: int, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.world_size = world_size
        self.num_experts = num_experts
        self.device = torch.device(device)

    def send_batch(
        self, prompts: Sequence[Sequence[int]], params: Sequence[GenerateParams], prefill_chunk: int
    ) -> Batch:
        """Send a batch to the followers; return it as they read it."""
        rows_list = [params_row(p, len(ids)) for ids, p in zip(prompts, params, strict=True)]
        rows = torch.tensor(rows_list, dtype=torch.long, device=self.device)
        flat = torch.tensor([t for ids in prompts for t in ids], dtype=torch.long, device=self.device)
        self._send_header(Op.GENERATE, len(prompts), [flat.numel(), prefill_chunk])
        self._broadcast(rows)
        self._broadcast(flat)
        return decode_batch(rows, flat, prefill_chunk)

    def send_step(self, step: Step) -> None:
        """Send one iteration of the continuous batch to the followers."""
        if self.world_size == 1:
            return
        rows = [[start, len(t), len(b)] for start, t, b in zip(step.starts, step.tokens, step.tables, strict=True)]
        rows_W3 = torch.tensor(rows, dtype=torch.long, device=self.device).view(-1, 3)
        tokens_N = torch.tensor([t for ts in step.tokens for t in ts], dtype=torch.long, device=self.device)
        blocks_M = torch.tensor([b for bs in step.tables for b in bs], dtype=torch.long, device=self.device)
        extra = [tokens_N.numel(), blocks_M.numel(), step.num_blocks, step.block_size]
        self._send_header(Op.STEP, len(rows), extra)
        self._broadcast(rows_W3)
        self._broadcast(tokens_N)
        self._broadcast(blocks_M)

    def send_placement(self, placement: ActivePlacement) -> None:
        tables = placement_tables(placement).to(self.device)
        self._send_header(Op.APPLY_PLACEMENT, placement.generation, list(tables.shape))
        self._broadcast(tables)

    def share_step(self, step_2B: Tensor) -> Tensor:
        """One decoding step of a batch of B rows, as rank 0 decided it: [2, B] int64, its sampled tokens and whether
        each row stays in the batch. Rank 0 sends its own; a follower passes zeros of that shape and gets rank 0's."""
        self._broadcast(step_2B)
        return step_2B

    def send_stop(self) -> None:
        self._send_header(Op.STOP, 0, [])

    def send_heartbeat(self) -> None:
        self._send_header(Op.HEARTBEAT, 0, [])

    def receive(self) -> Message:
        """The next message from rank 0 (blocks; on a follower)."""
        header = self._zeros(HEADER_LEN)
        dist.broadcast(header, src=0)
        op, arg, *rest = header.tolist()
        if op == Op.STOP:
            return Stop()
        if op == Op.HEARTBEAT:
            return Heartbeat()
        if op == Op.STEP:
            num_tokens, num_table_blocks, num_blocks, block_size = rest[:4]
            rows, tokens, blocks = self._zeros(arg, 3), self._zeros(num_tokens), self._zeros(num_table_blocks)
            for tensor in (rows, tokens, blocks):
                dist.broadcast(tensor, src=0)
            return decode_step(rows, tokens, blocks, num_blocks, block_size)
        if op == Op.APPLY_PLACEMENT:
            tables = self._zeros(*rest[:3])
            dist.broadcast(tables, src=0)
            return placement_from_tables(arg, tables, self.num_experts)
        assert op == Op.GENERATE, f"unknown op {op} from rank 0"
        rows = self._zeros(arg, PARAMS_LEN)
        dist.broadcast(rows, src=0)
        flat = self._zeros(rest[0])
        dist.broadcast(flat, src=0)
        return decode_batch(rows, flat, rest[1])

    def _send_header(self, op: Op, arg: int, rest: list[int]) -> None:
        if self.world_size > 1:
            values = [int(op), arg, *rest]
            header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.long, device=self.device)

    def _broadcast(self, tensor: Tensor) -> None:
        if self.world_size > 1:
            dist.broadcast(tensor, src=0)
