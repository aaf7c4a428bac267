"""A paged decoding cache: every layer's per-token entries in fixed-size blocks of one shared pool.

`PagedPool` holds, for each layer, `num_blocks` blocks of `block_size` token slots. For MLA a slot holds what
`MLACache` keeps of a token (the latent RMSNorm(c_kv) [kv_lora_rank] and the rotated rope key [qk_rope_head_dim]),
so a token costs (kv_lora_rank + qk_rope_head_dim) values per layer; for GQA it holds the rotated key and the value
of each KV head [G, K], paged the same way. Which blocks belong to which sequence is decided elsewhere (the serving
engine's block manager, `k2_workers.serve.blocks`): a forward gets a `PagedView`, the block table and the cached
length of each of its rows, and reads and writes the pool through it. Blocks of one sequence need not be
contiguous, and a block may appear in several rows' tables (a shared prompt prefix, never written again).

The view gathers each row's keys into a dense [B, T, ...] tensor (T = the longest row's cached tokens plus the new
ones): simple and exact, not a paged-attention kernel. Keys past a row's own length are hidden by `visible`.
A `PackedView` instead packs rows that feed different numbers of tokens into one batch row [1, N] (no padding): its
keys are the rows' keys one after the other, and a query sees only its own row's keys up to its position.

Shape legend: L = layers, N = num_blocks · block_size slots, B = rows, S = new tokens per row, T = attended tokens,
M = blocks per row's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from k2_workers.model.config import K2Config
from k2_workers.model.kv_cache import visible_keys


def entry_shapes(config: K2Config) -> list[tuple[int, ...]]:
    """The shapes of what one token leaves in one layer: (latent, rope key) for MLA, (key, value) for GQA."""
    if config.attention_type == "gqa":
        head = (config.num_key_value_heads, config.gqa_head_dim)
        return [head, head]
    return [(config.kv_lora_rank,), (config.qk_rope_head_dim,)]


class PagedPool:
    """Storage for `num_blocks` blocks of `block_size` tokens, in every layer: buffers [L, N, ...] of flat slots
    (slot = block · block_size + offset)."""

    def __init__(
        self,
        config: K2Config,
        num_blocks: int,
        block_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.attention_type = config.attention_type
        self.num_blocks = num_blocks
        self.block_size = block_size
        layers, slots = config.num_hidden_layers, num_blocks * block_size
        self.buffers = [
            torch.zeros(layers, slots, *shape, device=device, dtype=dtype) for shape in entry_shapes(config)
        ]

    @property
    def device(self) -> torch.device:
        return self.buffers[0].device

    @staticmethod
    def bytes_per_token(config: K2Config, dtype: torch.dtype) -> int:
        """What one cached token costs over all layers."""
        values = sum(math.prod(shape) for shape in entry_shapes(config))
        return config.num_hidden_layers * values * dtype.itemsize

    def view(self, block_tables: Sequence[Sequence[int]], past: Sequence[int], num_new: int) -> PagedView:
        """A forward of `num_new` tokens per row: row b holds `past[b]` cached tokens in the blocks
        `block_tables[b]`, which must have room for `num_new` more."""
        return PagedView(self, block_tables, past, num_new)

    def packed_view(
        self, block_tables: Sequence[Sequence[int]], past: Sequence[int], lengths: Sequence[int]
    ) -> PackedView:
        """A forward of one packed row: row b's `lengths[b]` new tokens after its `past[b]` cached ones."""
        return PackedView(self, block_tables, past, lengths)

    def slots(self, table: Sequence[int], start: int, end: int) -> Tensor:
        """The flat slots of positions start..end-1 of a sequence whose blocks are `table`."""
        if len(table) * self.block_size < end:
            raise ValueError(f"block_tables: a row has {len(table)} blocks for {end} tokens")
        positions = torch.arange(start, end, device=self.device)
        blocks = torch.tensor(list(table), dtype=torch.long, device=self.device)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size


class PagedView:
    """One forward's cache (`ForwardCache`): its rows' tables, cached lengths and new-token count."""

    def __init__(
        self, pool: PagedPool, block_tables: Sequence[Sequence[int]], past: Sequence[int], num_new: int
    ) -> None:
        if len(block_tables) != len(past) or not past:
            raise ValueError(f"block_tables: {len(block_tables)} rows for {len(past)} cached lengths")
        size, device = pool.block_size, pool.device
        self.pool = pool
        self.attention_type = pool.attention_type
        self.num_new = num_new
        self.past_B = torch.tensor(list(past), dtype=torch.long, device=device)
        num_keys = max(past) + num_new
        width = math.ceil(num_keys / size)
        for row, (table, cached) in enumerate(zip(block_tables, past, strict=True)):
            if len(table) * size < cached + num_new:
                raise ValueError(f"block_tables: row {row} has {len(table)} blocks for {cached + num_new} tokens")
        padded = [list(table[:width]) + [0] * (width - len(table[:width])) for table in block_tables]
        table_BM = torch.tensor(padded, dtype=torch.long, device=device)
        keys_T = torch.arange(num_keys, device=device)
        self._read_BT = table_BM[:, keys_T // size] * size + keys_T % size  # a row's keys past its own are hidden
        new_BS = self.past_B[:, None] + torch.arange(num_new, device=device)
        self._write_BS = torch.gather(table_BM, 1, new_BS // size) * size + new_BS % size
        self._visible: dict[tuple[int, int, int | None], Tensor] = {}  # the same for every layer

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Write one layer's new entries [B, S, ...] into their slots; return each row's keys [B, T, ...]."""
        keys = []
        for buffer, values in zip(self.pool.buffers, new, strict=True):
            layer = buffer[layer_idx]
            layer.index_copy_(0, self._write_BS.flatten(), values.reshape(-1, *layer.shape[1:]).to(layer.dtype))
            keys.append(layer[self._read_BT])
        return tuple(keys)

    def advance(self, num_tokens: int) -> None:
        """Nothing to commit: the block manager keeps each sequence's length."""

    def positions(self, num_tokens: int) -> Tensor:
        return self.past_B[:, None] + torch.arange(num_tokens, device=self.past_B.device)

    def visible(self, num_queries: int, num_keys: int, window: int | None = None) -> Tensor | None:
        key = (num_queries, num_keys, window)
        if key not in self._visible:
            self._visible[key] = visible_keys(num_queries, num_keys, self.past_B, window, None, self.past_B.device)
        return self._visible[key]


class PackedView:
    """One forward's cache (`ForwardCache`) for rows packed into one batch row [1, N]: row b feeds `lengths[b]`
    tokens after its `past[b]` cached ones, in the blocks `block_tables[b]`."""

    def __init__(
        self, pool: PagedPool, block_tables: Sequence[Sequence[int]], past: Sequence[int], lengths: Sequence[int]
    ) -> None:
        if not len(block_tables) == len(past) == len(lengths) or not past:
            raise ValueError(f"block_tables: {len(block_tables)} rows for {len(past)} cached lengths")
        device = pool.device
        self.pool = pool
        self.attention_type = pool.attention_type
        rows = range(len(past))
        self._read_T = torch.cat([pool.slots(block_tables[b], 0, past[b] + lengths[b]) for b in rows])
        self._write_N = torch.cat([pool.slots(block_tables[b], past[b], past[b] + lengths[b]) for b in rows])
        self._positions_N = torch.cat([torch.arange(past[b], past[b] + lengths[b], device=device) for b in rows])
        key_positions_T = torch.cat([torch.arange(past[b] + lengths[b], device=device) for b in rows])
        row_N = torch.repeat_interleave(
            torch.arange(len(past), device=device), torch.tensor(list(lengths), device=device)
        )
        row_T = torch.repeat_interleave(
            torch.arange(len(past), device=device),
            torch.tensor([p + n for p, n in zip(past, lengths, strict=True)], device=device),
        )
        self._same_row_NT = row_N[:, None] == row_T[None, :]
        self._behind_NT = self._positions_N[:, None] - key_positions_T[None, :]  # >= 0: the key is not ahead
        self.last_B = torch.cumsum(torch.tensor(list(lengths), device=device), 0) - 1  # each row's last token

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Write one layer's new entries [1, N, ...]; return the rows' keys, one row after the other [1, T, ...]."""
        keys = []
        for buffer, values in zip(self.pool.buffers, new, strict=True):
            layer = buffer[layer_idx]
            layer.index_copy_(0, self._write_N, values.reshape(-1, *layer.shape[1:]).to(layer.dtype))
            keys.append(layer[self._read_T][None])
        return tuple(keys)

    def advance(self, num_tokens: int) -> None:
        """Nothing to commit: the block manager keeps each sequence's length."""

    def positions(self, num_tokens: int) -> Tensor:
        return self._positions_N[None]

    def visible(self, num_queries: int, num_keys: int, window: int | None = None) -> Tensor | None:
        visible_NT = self._same_row_NT & (self._behind_NT >= 0)
        if window is not None:
            visible_NT &= self._behind_NT < window
        return visible_NT[None, None]
