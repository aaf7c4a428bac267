"""A tiny stand-in for the K2 model with the same module names, for optimizer tests that need no real model.

Shape legend: B = batch, S = sequence, H = heads, D = hidden, E = experts, I = expert intermediate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TinyConfig:
    hidden_size: int = 32
    num_attention_heads: int = 4
    q_lora_rank: int | None = 16
    kv_lora_rank: int = 12
    qk_nope_head_dim: int = 8
    qk_rope_head_dim: int = 4
    v_head_dim: int = 8
    n_routed_experts: int = 4
    moe_intermediate_size: int = 16
    num_hidden_layers: int = 2
    vocab_size: int = 64


def _rope(x_BSHR: Tensor) -> Tensor:
    """Rotate-half RoPE with theta 10000 over the last dim."""
    seq, dim = x_BSHR.shape[1], x_BSHR.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles_SR = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq).repeat(1, 2).to(x_BSHR.dtype)
    cos, sin = angles_SR.cos()[None, :, None], angles_SR.sin()[None, :, None]
    x1, x2 = x_BSHR.chunk(2, dim=-1)
    return x_BSHR * cos + torch.cat([-x2, x1], dim=-1) * sin


class TinyMLA(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        q_out = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.last_max_logits_H = torch.zeros(h)

    def forward(self, x_BSD: Tensor) -> Tensor:
        cfg = self.cfg
        b, s, _ = x_BSD.shape
        h, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_proj(x_BSD) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rope = q.view(b, s, h, nope + rope).split([nope, rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, s, h, nope + cfg.v_head_dim)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        k_rope = _rope(k_rope.unsqueeze(2)).expand(b, s, h, rope)
        q_full = torch.cat([q_nope, _rope(q_rope)], dim=-1).transpose(1, 2)
        k_full = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)
        logits_BHSS = q_full @ k_full.transpose(-1, -2) / math.sqrt(nope + rope)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        logits_BHSS = logits_BHSS.masked_fill(~causal, float("-inf"))
        self.last_max_logits_H = logits_BHSS.detach().amax(dim=(0, 2, 3))
        out = logits_BHSS.softmax(-1) @ v.transpose(1, 2)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class TinyExperts(nn.Module):
    """Stacked expert weights, every token through every expert (routing is irrelevant to the optimizer)."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        e, i, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_proj = nn.Parameter(torch.randn(e, i, d) / math.sqrt(d))
        self.up_proj = nn.Parameter(torch.randn(e, i, d) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(e, d, i) / math.sqrt(i))

    def forward(self, x_BSD: Tensor) -> Tensor:
        hidden = torch.einsum("bsd,eid->bsei", x_BSD, self.gate_proj).sigmoid()
        hidden = hidden * torch.einsum("bsd,eid->bsei", x_BSD, self.up_proj)
        return torch.einsum("bsei,edi->bsd", hidden, self.down_proj) / self.gate_proj.shape[0]


class TinyGate(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.02)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class TinyMoE(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.gate = TinyGate(cfg)
        self.experts = TinyExperts(cfg)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.experts(x_BSD) + 0.0 * (x_BSD @ self.gate.weight.T).sum()


class TinyLayer(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size)
        self.self_attn = TinyMLA(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size)
        self.mlp = TinyMoE(cfg)

    def forward(self, x_BSD: Tensor) -> Tensor:
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD))
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyBackbone(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TinyLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)


class TinyK2(nn.Module):
    """``model.{embed_tokens, layers[i].{self_attn, mlp}, norm}``, ``lm_head`` and ``max_attention_logits()``."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = TinyBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids_BS: Tensor) -> Tensor:
        x = self.model.embed_tokens(input_ids_BS)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))

    def max_attention_logits(self) -> Tensor:
        return torch.stack([layer.self_attn.last_max_logits_H for layer in self.model.layers])
