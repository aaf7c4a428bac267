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
