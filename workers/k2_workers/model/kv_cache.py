"""The MLA decoding cache: per layer it keeps only the compressed latent RMSNorm(c_kv) [kv_lora_rank] and the
rotated shared rope key [qk_rope_head_dim] of each token, not per-head keys and values (the absorbed form).

Rows of one cache may hold sequences of different lengths, right-aligned: row b's first `pad_B[b]` positions are
padding that no query attends to, and its tokens sit at positions pad_B[b].. with RoPE positions counted from
there (`join` builds such a cache from separately prefilled sequences, so padding never enters a forward pass).

Shape legend: L = layers, B = batch, T = cache capacity (tokens), C = kv_lora_rank, R = qk_rope_head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from k2_workers.model.config import K2Config


class MLACache:
    """A preallocated cache for `max_seq_len` tokens of `batch_size` sequences decoded in lockstep."""

    def __init__(
        self,
        config: K2Config,
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len: must be > 0, got {max_seq_len}")
        num_layers = config.num_hidden_layers
        self.latent_LBTC = torch.zeros(
            num_layers, batch_size, max_seq_len, config.kv_lora_rank, device=device, dtype=dtype
        )
        self.rope_LBTR = torch.zeros(
            num_layers, batch_size, max_seq_len, config.qk_rope_head_dim, device=device, dtype=dtype
        )
        self.seq_len = 0  # tokens committed by every layer
        self.pad_B = torch.zeros(batch_size, dtype=torch.long, device=device)  # leading padding of each row

    @classmethod
    def join(cls, caches: list[MLACache], max_seq_len: int) -> MLACache:
        """One cache of `max_seq_len` positions whose row i continues the (single-row) `caches[i]`, right-aligned
        so that every row's next token lands at the same position."""
        if not caches or any(c.latent_LBTC.shape[1] != 1 for c in caches):
            raise ValueError("join: needs at least one cache, each of batch size 1")
        longest = max(c.seq_len for c in caches)
        if longest > max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} is shorter than the longest sequence, {longest}")
        first = caches[0]
        joined = cls.__new__(cls)
        num_layers, _, _, rank = first.latent_LBTC.shape
        joined.latent_LBTC = first.latent_LBTC.new_zeros(num_layers, len(caches), max_seq_len, rank)
        joined.rope_LBTR = first.rope_LBTR.new_zeros(num_layers, len(caches), max_seq_len, first.rope_LBTR.shape[-1])
        joined.seq_len = longest
        joined.pad_B = torch.tensor([longest - c.seq_len for c in caches], device=first.pad_B.device)
        for row, (cache, pad) in enumerate(zip(caches, joined.pad_B.tolist(), strict=True)):
            joined.latent_LBTC[:, row, pad:longest] = cache.latent_LBTC[:, 0, : cache.seq_len]
            joined.rope_LBTR[:, row, pad:longest] = cache.rope_LBTR[:, 0, : cache.seq_len]
        return joined

    @property
    def max_seq_len(self) -> int:
        return self.latent_LBTC.shape[2]

    @property
    def values_per_token_per_layer(self) -> int:
        return self.latent_LBTC.shape[-1] + self.rope_LBTR.shape[-1]

    def update(self, layer_idx: int, latent_BSC: Tensor, rope_BSR: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new tokens of one layer after the committed ones; return that layer's whole prefix."""
        end = self.seq_len + latent_BSC.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"max_seq_len: the cache holds {self.max_seq_len} tokens, {end} requested")
        self.latent_LBTC[layer_idx, :, self.seq_len : end] = latent_BSC
        self.rope_LBTR[layer_idx, :, self.seq_len : end] = rope_BSR
        return self.latent_LBTC[layer_idx, :, :end], self.rope_LBTR[layer_idx, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Commit `num_tokens` new tokens once every layer has written them."""
        self.seq_len += num_tokens
