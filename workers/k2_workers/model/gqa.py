"""Grouped-query attention (GQA, as Mixtral and Llama 2 70B): H query heads share G = num_key_value_heads key/value
heads, query head h reading KV head h // (H / G). RoPE rotates the whole head; an optional sliding window limits each
query to its last `sliding_window` tokens (itself included). The `GQACache` keeps K (rotated) and V per KV head (a
`PagedView` the same entries in paged blocks).

Recording the largest logit per query head (QK-Clip's S_max) does not change how attention is computed; as in MLA,
it is a separate no-grad pass over query chunks.

Shape legend: B = batch, S = new tokens, T = attended tokens, H = query heads, G = KV heads, K = head dim, D = hidden,
P = K/2 rotary pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2_workers.model.attention import causal_max_logits
from k2_workers.model.config import K2Config
from k2_workers.model.kv_cache import ForwardCache, visible_keys
from k2_workers.model.rope import apply_rope, softmax_scale


class GQAttention(nn.Module):
    """`self_attn` with q_proj, k_proj, v_proj, o_proj (the Hugging Face Llama / Mistral / Mixtral names)."""

    last_max_logits_H: Tensor

    def __init__(self, config: K2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.gqa_head_dim
        self.sliding_window = config.sliding_window
        self.rope_interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        self.register_buffer("last_max_logits_H", torch.zeros(self.num_heads), persistent=False)

    @property
    def heads_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSP: Tensor,
        sin_BSP: Tensor,
        *,
        cache: ForwardCache | None = None,
        record_max_logits: bool = False,
    ) -> Tensor:
        b, s, _ = x_BSD.shape
        q_BHSK = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSK = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSK = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSK = apply_rope(q_BHSK, cos_BSP, sin_BSP, self.rope_interleave)
        k_BGSK = apply_rope(k_BGSK, cos_BSP, sin_BSP, self.rope_interleave)

        if cache is None:
            past, mask = 0, None
            if self.sliding_window is not None:
                mask = visible_keys(s, s, 0, self.sliding_window, None, x_BSD.device)
            k_BGTK, v_BGTK = k_BGSK, v_BGSK
        else:
            k_BTGK, v_BTGK = cache.update(self.layer_idx, k_BGSK.transpose(1, 2), v_BGSK.transpose(1, 2))
            k_BGTK, v_BGTK = k_BTGK.transpose(1, 2), v_BTGK.transpose(1, 2)
            t = k_BGTK.shape[2]
            past = t - s  # the longest row's past; `visible` has each row's own
            mask = cache.visible(s, t, self.sliding_window)
            if mask is None:  # SDPA's is_causal aligns queries to the first keys: spell the causal mask out
                mask = visible_keys(s, t, past, None, None, x_BSD.device)

        if record_max_logits:
            self.last_max_logits_H = self._max_logits(q_BHSK, k_BGTK, past, mask)
        out_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BGTK, v_BGTK, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
        )
        out_BSD: Tensor = self.o_proj(out_BHSK.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
        return out_BSD

    @torch.no_grad()
    def _max_logits(self, q_BHSK: Tensor, k_BGTK: Tensor, past: int, mask: Tensor | None) -> Tensor:
        """[H] fp32: the largest visible pre-softmax logit of each query head."""
        k_BHTK = k_BGTK.repeat_interleave(self.heads_per_kv_head, dim=1)
        if mask is None or (mask.shape[0] == 1 and past == 0):  # causal, possibly windowed: chunked
            return causal_max_logits(q_BHSK, k_BHTK, self.scale, past, window=self.sliding_window)
        logits_BHST = torch.matmul(q_BHSK, k_BHTK.transpose(-1, -2)).float() * self.scale
        return logits_BHST.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))

    @torch.no_grad()
    def clip_heads_(self, gamma_H: Tensor) -> None:
        """QK-Clip for GQA: every logit of query head h scales by exactly gamma_H[h] (<= 1).

        The rule for a shared key: KV group g takes gamma_G[g] = the largest gamma of its heads (its mildest clip);
        its key rows are scaled by sqrt(gamma_G[g]) and the query rows of each head h of the group by
        gamma_H[h] / sqrt(gamma_G[g]). With one head per group this is K2's sqrt(gamma) on q and on k; a group with
        an unclipped head (gamma 1) keeps its key, and only its clipped heads' queries shrink.
        """
        gamma_GR = gamma_H.float().view(self.num_kv_heads, self.heads_per_kv_head)
        root_G = gamma_GR.amax(dim=1).sqrt()
        _scale_rows_(self.q_proj, (gamma_GR / root_G[:, None]).reshape(-1), self.head_dim)
        _scale_rows_(self.k_proj, root_G, self.head_dim)


def _scale_rows_(linear: nn.Linear, scale_N: Tensor, rows_per_head: int) -> None:
    """Scale each head's block of output rows (and bias) by its factor."""
    rows = scale_N.to(linear.weight.device).repeat_interleave(rows_per_head)
    linear.weight.mul_(rows[:, None].to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.mul_(rows.to(linear.bias.dtype))
