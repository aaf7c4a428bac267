"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3) with decoupled RoPE and per-head max-logit recording.

Without a cache the keys and values are expanded from the latent (the "naive" form, as transformers computes it);
with a cache (an `MLACache`, or a `PagedView` of paged blocks) the cached latent is used directly by absorbing
kv_b_proj into the query and the output (the "absorbed" form). Both compute the same function.

Recording the largest logit per head (QK-Clip's S_max, in training) does not change how attention is computed:
the naive form still runs `scaled_dot_product_attention` (flash or memory-efficient kernels on GPU), and the maximum
is taken separately, without autograd, over query chunks of at most `MAX_LOGIT_CHUNK_ELEMENTS` logits, so no
[B, H, S, S] tensor is ever held for the backward pass.

Shape legend: B = batch, S = new tokens, T = attended tokens, H = heads, D = hidden, C = kv_lora_rank,
N = qk_nope_head_dim, R = qk_rope_head_dim, K = N + R, V = v_head_dim, P = R/2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2_workers.model.config import K2Config
from k2_workers.model.kv_cache import ForwardCache
from k2_workers.model.norm import RMSNorm
from k2_workers.model.rope import apply_rope, softmax_scale

MAX_LOGIT_CHUNK_ELEMENTS = 1 << 24  # logits materialised at once while recording max logits (64 MiB in fp32)


@torch.no_grad()
def causal_max_logits(
    q_BHSK: Tensor,
    k_BHTK: Tensor,
    scale: float,
    past: int = 0,
    chunk_elements: int = MAX_LOGIT_CHUNK_ELEMENTS,
    window: int | None = None,
) -> Tensor:
    """The largest causal pre-softmax logit `scale · q·k` of every head, [H] in fp32, computed over query chunks.

    Query i (absolute position past + i) sees keys 0..past + i, and with a sliding `window` only the last `window`.
    """
    b, h, s, _ = q_BHSK.shape
    t = k_BHTK.shape[2]
    rows = max(1, chunk_elements // max(1, b * h * t))
    keys_T = torch.arange(t, device=q_BHSK.device)
    best_H = torch.full((h,), float("-inf"), device=q_BHSK.device)
    for start in range(0, s, rows):
        q_BHCK = q_BHSK[:, :, start : start + rows]
        logits_BHCT = torch.matmul(q_BHCK, k_BHTK.transpose(-1, -2)).float() * scale
        queries_C = torch.arange(start, start + q_BHCK.shape[2], device=q_BHSK.device) + past
        hidden_CT = keys_T[None, :] > queries_C[:, None]
        if window is not None:
            hidden_CT |= queries_C[:, None] - keys_T[None, :] >= window
        logits_BHCT.masked_fill_(hidden_CT, float("-inf"))
        best_H = torch.maximum(best_H, logits_BHCT.amax(dim=(0, 2, 3)))
    return best_H


class MLAttention(nn.Module):
    last_max_logits_H: Tensor

    def __init__(self, config: K2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        self.scale = softmax_scale(config)
        d, h, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, h * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, h * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * config.v_head_dim, d, bias=bias)
        # Largest pre-softmax logit per head of the last recording forward (QK-Clip's S_max).
        self.register_buffer("last_max_logits_H", torch.zeros(h), persistent=False)

    def _query(self, x_BSD: Tensor) -> Tensor:
        lora = self.q_lora_rank is not None
        q: Tensor = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD))) if lora else self.q_proj(x_BSD)
        b, s, _ = x_BSD.shape
        return q.view(b, s, self.num_heads, -1).transpose(1, 2)  # [B, H, S, K]

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
        q_BHSK = self._query(x_BSD)
        q_nope_BHSN, q_rope_BHSR = torch.split(q_BHSK, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rope_BHSR = apply_rope(q_rope_BHSR, cos_BSP, sin_BSP, self.rope_interleave)

        latent_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent_BSC = self.kv_a_layernorm(latent_BSC)
        k_rope_BSR = apply_rope(k_rope_BSR, cos_BSP, sin_BSP, self.rope_interleave)

        if cache is None:
            out_BHSV = self._naive(q_nope_BHSN, q_rope_BHSR, latent_BSC, k_rope_BSR, record_max_logits)
        else:
            latent_BTC, k_rope_BTR = cache.update(self.layer_idx, latent_BSC, k_rope_BSR)
            visible_B1ST = cache.visible(s, latent_BTC.shape[1])
            out_BHSV = self._absorbed(q_nope_BHSN, q_rope_BHSR, latent_BTC, k_rope_BTR, record_max_logits, visible_B1ST)
        out_BSD: Tensor = self.o_proj(out_BHSV.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim))
        return out_BSD

    def _naive(
        self, q_nope_BHSN: Tensor, q_rope_BHSR: Tensor, latent_BSC: Tensor, k_rope_BSR: Tensor, record: bool
    ) -> Tensor:
        b, h, s, _ = q_nope_BHSN.shape
        kv_BHSX = self.kv_b_proj(latent_BSC).view(b, s, h, -1).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSX.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q_BHSK = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
        k_BHSK = torch.cat([k_nope_BHSN, k_rope_BSR[:, None].expand(b, h, s, -1)], dim=-1)
        if record:
            self.last_max_logits_H = causal_max_logits(q_BHSK, k_BHSK, self.scale)
        return F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSV, is_causal=True, scale=self.scale)

    def _absorbed(
        self,
        q_nope_BHSN: Tensor,
        q_rope_BHSR: Tensor,
        latent_BTC: Tensor,
        k_rope_BTR: Tensor,
        record: bool,
        visible_B1ST: Tensor | None = None,
    ) -> Tensor:
        w_HXC = self.kv_b_proj.weight.view(self.num_heads, -1, self.kv_lora_rank)
        w_k_HNC, w_v_HVC = torch.split(w_HXC, [self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent_BHSC = torch.einsum("bhsn,hnc->bhsc", q_nope_BHSN, w_k_HNC)
        logits_BHST = torch.einsum("bhsc,btc->bhst", q_latent_BHSC, latent_BTC)
        logits_BHST = (logits_BHST + torch.einsum("bhsr,btr->bhst", q_rope_BHSR, k_rope_BTR)) * self.scale
        probs_BHST = self._softmax_probs(logits_BHST, visible_B1ST, record=record)
        out_latent_BHSC = torch.einsum("bhst,btc->bhsc", probs_BHST, latent_BTC)
        return torch.einsum("bhsc,hvc->bhsv", out_latent_BHSC, w_v_HVC)

    def _softmax_probs(self, logits_BHST: Tensor, visible_B1ST: Tensor | None, record: bool) -> Tensor:
        """Softmax over the visible keys: the cache's `visible`, or plain causal over a shared past."""
        if visible_B1ST is None:
            s, t = logits_BHST.shape[-2:]
            visible_B1ST = torch.ones(s, t, dtype=torch.bool, device=logits_BHST.device).tril(diagonal=t - s)
        logits_BHST = logits_BHST.masked_fill(~visible_B1ST, float("-inf"))
        if record:
            with torch.no_grad():
                self.last_max_logits_H = logits_BHST.detach().amax(dim=(0, 2, 3)).float()
        return F.softmax(logits_BHST, dim=-1, dtype=torch.float32).to(logits_BHST.dtype)
