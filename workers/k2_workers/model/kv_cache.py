"""Decoding caches: per layer, what each token leaves behind for later queries.

- `MLACache` (MLA): only the compressed latent RMSNorm(c_kv) [kv_lora_rank] and the rotated shared rope key
  [qk_rope_head_dim] of each token, not per-head keys and values (the absorbed form).
- `GQACache` (GQA): the rotated key and the value of each KV head [num_key_value_heads, head_dim].

Rows of one cache may hold sequences of different lengths, right-aligned: row b's first `pad_B[b]` positions are
padding that no query attends to, and its tokens sit at positions pad_B[b].. with RoPE positions counted from
there (`join` builds such a cache from separately prefilled sequences, so padding never enters a forward pass).
`new_cache` builds the cache that a config's attention uses. `paged_cache.PagedView` is the other kind of cache a
forward takes: the same entries in fixed-size blocks of a shared pool, read through a block table per sequence.

Every cache tells a forward where its new tokens sit (`positions`) and which keys each query sees (`visible`), so
the attention needs no knowledge of how the cache lays its rows out.

Shape legend: L = layers, B = batch, T = cache capacity (tokens), C = kv_lora_rank, R = qk_rope_head_dim,
G = KV heads, K = head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Protocol, Self

import torch
from torch import Tensor

from k2_workers.model.config import K2Config


class ForwardCache(Protocol):
    """What a forward's attention layers need of a cache."""

    attention_type: str  # "mla" or "gqa": the attention whose entries it holds

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Store one layer's new entries [B, S, ...]; return that layer's keys for the new queries [B, T, ...]."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Every layer has stored the forward's `num_tokens` new tokens."""
        ...

    def positions(self, num_tokens: int) -> Tensor:
        """RoPE positions [B, S] of the forward's new tokens."""
        ...

    def visible(self, num_queries: int, num_keys: int, window: int | None = None) -> Tensor | None:
        """Bool [B or 1, 1, S, T]: which keys each new query sees; None for plain causal over a shared past."""
        ...


def visible_keys(
    num_queries: int,
    num_keys: int,
    past: int | Tensor,
    window: int | None,
    pad_B: Tensor | None,
    device: torch.device,
) -> Tensor:
    """Bool [B or 1, 1, S, T]: query i of row b (at key index past + i, `past` an int or one per row [B]) sees key j
    when j <= past + i, within the window (past + i - j < window), and not in its row's leading padding
    (j >= pad_B[b])."""
    offsets_S = torch.arange(num_queries, device=device)
    keys_T = torch.arange(num_keys, device=device)
    if isinstance(past, Tensor):
        queries_BS1 = (past.to(device)[:, None] + offsets_S[None, :])[:, :, None]
    else:
        queries_BS1 = (past + offsets_S)[None, :, None]
    visible_BST = keys_T[None, None, :] <= queries_BS1
    if window is not None:
        visible_BST &= queries_BS1 - keys_T[None, None, :] < window
    if pad_B is not None:
        visible_BST = visible_BST & (keys_T[None, :] >= pad_B[:, None])[:, None, :]
    return visible_BST[:, None]


class TokenCache:
    """Preallocated per-layer tensors [L, B, T, ...] for `T` tokens of `B` sequences decoded in lockstep, held in
    the attributes that `BUFFERS` names."""

    BUFFERS: ClassVar[tuple[str, ...]]

    def __init__(self, buffers: Sequence[Tensor]) -> None:
        self._set_buffers(buffers)
        batch_size = buffers[0].shape[1]
        self.seq_len = 0  # tokens committed by every layer
        self.pad_B = torch.zeros(batch_size, dtype=torch.long, device=buffers[0].device)  # leading padding

    @property
    def _buffers(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.BUFFERS]

    def _set_buffers(self, buffers: Sequence[Tensor]) -> None:
        assert len(buffers) == len(self.BUFFERS)
        for name, buffer in zip(self.BUFFERS, buffers, strict=True):
            setattr(self, name, buffer)

    @staticmethod
    def _allocate(
        max_seq_len: int, shapes: Sequence[tuple[int, ...]], device: torch.device | str | None, dtype: torch.dtype
    ) -> list[Tensor]:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len: must be > 0, got {max_seq_len}")
        return [torch.zeros(n, b, max_seq_len, *rest, device=device, dtype=dtype) for n, b, *rest in shapes]

    @classmethod
    def join(cls, caches: Sequence[Self], max_seq_len: int) -> Self:
        """One cache of `max_seq_len` positions whose row i continues the (single-row) `caches[i]`, right-aligned
        so that every row's next token lands at the same position."""
        if not caches or any(c._buffers[0].shape[1] != 1 for c in caches):
            raise ValueError("join: needs at least one cache, each of batch size 1")
        longest = max(c.seq_len for c in caches)
        if longest > max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} is shorter than the longest sequence, {longest}")
        first = caches[0]
        joined = cls.__new__(cls)
        joined._set_buffers([b.new_zeros(b.shape[0], len(caches), max_seq_len, *b.shape[3:]) for b in first._buffers])
        joined.seq_len = longest
        joined.pad_B = torch.tensor([longest - c.seq_len for c in caches], device=first.pad_B.device)
        for row, (cache, pad) in enumerate(zip(caches, joined.pad_B.tolist(), strict=True)):
            for target, source in zip(joined._buffers, cache._buffers, strict=True):
                target[:, row, pad:longest] = source[:, 0, : cache.seq_len]
        return joined

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the rows at indices `rows` (in that order): the other sequences leave the batch."""
        self._set_buffers([b[:, rows] for b in self._buffers])
        self.pad_B = self.pad_B[rows]

    @property
    def max_seq_len(self) -> int:
        return self._buffers[0].shape[2]

    @property
    def values_per_token_per_layer(self) -> int:
        return sum(math.prod(b.shape[3:]) for b in self._buffers)

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, ...]:
        """Write the new tokens [B, S, ...] of one layer after the committed ones; return that layer's prefixes."""
        end = self.seq_len + new[0].shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"max_seq_len: the cache holds {self.max_seq_len} tokens, {end} requested")
        for buffer, values in zip(self._buffers, new, strict=True):
            buffer[layer_idx, :, self.seq_len : end] = values
        return tuple(buffer[layer_idx, :, :end] for buffer in self._buffers)

    def advance(self, num_tokens: int) -> None:
        """Commit `num_tokens` new tokens once every layer has written them."""
        self.seq_len += num_tokens

    def positions(self, num_tokens: int) -> Tensor:
        """RoPE positions [B, S] of the next `num_tokens` tokens: a right-aligned row counts from its first token."""
        b = self.pad_B.shape[0]
        start_BS = torch.arange(self.seq_len, self.seq_len + num_tokens, device=self.pad_B.device).expand(b, -1)
        return start_BS - self.pad_B[:, None]

    def visible(self, num_queries: int, num_keys: int, window: int | None = None) -> Tensor | None:
        """Which of the `num_keys` keys `update` returned each new query sees ([B or 1, 1, S, T] bool); None when
        that is plain causal attention over a past shared by every row (no padding, no window)."""
        padded = bool(self.pad_B.any())
        if not padded and window is None:
            return None
        pad_B = self.pad_B if padded else None
        return visible_keys(num_queries, num_keys, num_keys - num_queries, window, pad_B, self.pad_B.device)


class MLACache(TokenCache):
    """The latent [L, B, T, C] and the rope key [L, B, T, R] of each token."""

    BUFFERS = ("latent_LBTC", "rope_LBTR")
    attention_type = "mla"
    latent_LBTC: Tensor
    rope_LBTR: Tensor

    def __init__(
        self,
        config: K2Config,
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        layers = config.num_hidden_layers
        shapes = [(layers, batch_size, config.kv_lora_rank), (layers, batch_size, config.qk_rope_head_dim)]
        super().__init__(self._allocate(max_seq_len, shapes, device, dtype))

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, Tensor]:
        """(latent_BSC, rope_BSR) -> that layer's (latent_BTC, rope_BTR)."""
        latent_BTC, rope_BTR = super().update(layer_idx, *new)
        return latent_BTC, rope_BTR


class GQACache(TokenCache):
    """The rotated keys [L, B, T, G, K] and the values [L, B, T, G, K] of each token."""

    BUFFERS = ("k_LBTGK", "v_LBTGK")
    attention_type = "gqa"
    k_LBTGK: Tensor
    v_LBTGK: Tensor

    def __init__(
        self,
        config: K2Config,
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, config.gqa_head_dim)
        super().__init__(self._allocate(max_seq_len, [shape, shape], device, dtype))

    def update(self, layer_idx: int, *new: Tensor) -> tuple[Tensor, Tensor]:
        """(k_BSGK, v_BSGK) -> that layer's (k_BTGK, v_BTGK)."""
        k_BTGK, v_BTGK = super().update(layer_idx, *new)
        return k_BTGK, v_BTGK


KVCache = MLACache | GQACache


def new_cache(
    config: K2Config,
    batch_size: int,
    max_seq_len: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> KVCache:
    """The cache of the config's attention design."""
    kind = GQACache if config.attention_type == "gqa" else MLACache
    return kind(config, batch_size, max_seq_len, device=device, dtype=dtype)


def join_caches(caches: Sequence[KVCache], max_seq_len: int) -> KVCache:
    """`TokenCache.join` for single-row caches of one kind."""
    mla = [c for c in caches if isinstance(c, MLACache)]
    if len(mla) == len(caches):
        return MLACache.join(mla, max_seq_len)
    gqa = [c for c in caches if isinstance(c, GQACache)]
    if len(gqa) == len(caches):
        return GQACache.join(gqa, max_seq_len)
    raise ValueError("join: the caches are of different kinds")
