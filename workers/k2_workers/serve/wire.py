"""What rank 0 of a serving group broadcasts to the other ranks, and how they read it.

Every message starts with a header of `HEADER_LEN` int64: the op, then
- `STEP`: one iteration of the continuous batch (`Step`): the row count W, the total tokens N, the total block-table
  entries M, and the pool's block count and block size, followed by W rows of (start position, tokens, blocks),
  the N tokens and the M block ids, concatenated; every rank runs the same forwards on its own copy of the paged
  cache (attention is replicated), so the followers need no scheduler of their own, and only rank 0 samples;
- `APPLY_PLACEMENT`: the generation and the table shape [layers, ranks, slots], followed by the slot tables;
- `STOP`: nothing; the followers return.
- `HEARTBEAT`: nothing; rank 0 sends it while the group is idle, so the followers' wait for the next message never
  reaches the collective timeout.

The op numbers stay as they were: 1 was the static batch of the engine before continuous batching, and a follower
told it by a rank 0 of that version refuses it by name. A one-rank group sends nothing. Every tensor is made on the
wire's `device` (the GPU under nccl, which takes no CPU tensors); slot tables come back to the CPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from k2_workers.parallel import SlotTable
from k2_workers.serve.placement import ActivePlacement

HEADER_LEN = 6


class Op(enum.IntEnum):
    STOP = 0
    STATIC_BATCH = 1  # the engine before continuous batching: refused
    APPLY_PLACEMENT = 2
    HEARTBEAT = 3
    STEP = 4


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


Message = Step | ActivePlacement | Stop | Heartbeat


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
        if op == Op.STATIC_BATCH:
            raise RuntimeError("rank 0 sent a static batch: it runs an engine of another version")
        raise RuntimeError(f"unknown op {op} from rank 0")

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
