"""QK-Clip (Kimi K2 report §2.1): per-head rescaling of the MLA query/key projections after an optimizer step.

A head whose largest pre-softmax logit S_max exceeded tau gets gamma = tau / S_max; its head-specific q_nope and k_nope
rows are scaled by sqrt(gamma) and its q_rope rows by gamma, so every logit of that head scales by exactly gamma. The
shared k_rope (rows of ``kv_a_proj_with_mqa``), the value rows of ``kv_b_proj`` and ``o_proj`` are left alone.

Shape legend: L = attention layers, H = heads, R = rows of one head in a projection, D = input features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MLAHeadLayout:
    """Per-head row layout of the MLA projections (HF names): q rows are [nope | rope], kv_b rows are [k_nope | v]."""

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> MLAHeadLayout:
        """Reads the layout from a K2 / DeepSeek-V3 config object (HF field names)."""
        return cls(
            num_heads=int(config.num_attention_heads),
            qk_nope_head_dim=int(config.qk_nope_head_dim),
            qk_rope_head_dim=int(config.qk_rope_head_dim),
            v_head_dim=int(config.v_head_dim),
        )


def query_projection(attn: nn.Module) -> nn.Linear:
    """The projection producing per-head queries: ``q_b_proj`` with a query LoRA, ``q_proj`` without."""
    proj = getattr(attn, "q_b_proj", None)
    if proj is None:
        proj = attn.q_proj
    assert isinstance(proj, nn.Linear), f"unexpected query projection {type(proj).__name__}"
    return proj


def key_value_projection(attn: nn.Module) -> nn.Linear:
    """The projection producing per-head [k_nope | v] rows from the compressed KV."""
    proj = attn.kv_b_proj
    assert isinstance(proj, nn.Linear), f"unexpected kv_b_proj {type(proj).__name__}"
    return proj


def find_mla_attentions(model: nn.Module) -> list[nn.Module]:
    """The MLA attention modules in the order of ``model.max_attention_logits()`` rows: the model's own
    ``attention_layers()`` when it has one, else every module with ``kv_b_proj`` and ``kv_a_proj_with_mqa``."""
    attention_layers = getattr(model, "attention_layers", None)
    if callable(attention_layers):
        return list(attention_layers())
    return [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "kv_a_proj_with_mqa")]


def check_layout(attentions: Sequence[nn.Module], layout: MLAHeadLayout) -> None:
    """Raises ``ValueError`` when a projection's row count does not match the head layout."""
    q_rows = layout.num_heads * (layout.qk_nope_head_dim + layout.qk_rope_head_dim)
    kv_rows = layout.num_heads * (layout.qk_nope_head_dim + layout.v_head_dim)
    for i, attn in enumerate(attentions):
        if hasattr(attn, "clip_heads_"):  # GQA: the module applies its own rule (k2_workers.model.gqa)
            continue
        if query_projection(attn).out_features != q_rows:
            raise ValueError(
                f"layer {i}: query projection has {query_projection(attn).out_features} rows, want {q_rows}"
            )
        if key_value_projection(attn).out_features != kv_rows:
            raise ValueError(f"layer {i}: kv_b_proj has {key_value_projection(attn).out_features} rows, want {kv_rows}")


def clip_factors(max_logits_LH: Tensor, tau: float) -> Tensor:
    """gamma = tau / S_max where S_max > tau, else exactly 1 (NaN logits are never clipped)."""
    if not tau > 0:
        raise ValueError(f"qk_clip_tau must be > 0, got {tau}")
    s = max_logits_LH.float()
    return torch.where(s > tau, tau / s, torch.ones_like(s))


def _scale_head_rows_(proj: nn.Linear, row_scale_HR: Tensor) -> None:
    """Multiplies each head's rows of ``proj`` (weight and bias) by ``row_scale_HR``."""
    num_heads, rows_per_head = row_scale_HR.shape
    weight_HRD = proj.weight.view(num_heads, rows_per_head, -1)
    weight_HRD.mul_(row_scale_HR.to(weight_HRD.dtype).unsqueeze(-1))
    if proj.bias is not None:
        proj.bias.view(num_heads, rows_per_head).mul_(row_scale_HR.to(proj.bias.dtype))


@torch.no_grad()
def apply_qk_clip_(attn: nn.Module, gamma_H: Tensor, layout: MLAHeadLayout) -> None:
    """Rescales one attention layer in place: q_nope, k_nope by sqrt(gamma), q_rope by gamma (gamma = 1 is a no-op)."""
    kv_b_proj = key_value_projection(attn)
    gamma_H = gamma_H.to(kv_b_proj.weight.device, torch.float32)
    sqrt_gamma_H1 = gamma_H.sqrt().unsqueeze(-1)
    nope, rope, v = layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim
    q_scale_HR = torch.cat([sqrt_gamma_H1.expand(-1, nope), gamma_H.unsqueeze(-1).expand(-1, rope)], dim=-1)
    kv_scale_HR = torch.cat([sqrt_gamma_H1.expand(-1, nope), torch.ones_like(sqrt_gamma_H1).expand(-1, v)], dim=-1)
    _scale_head_rows_(query_projection(attn), q_scale_HR)
    _scale_head_rows_(kv_b_proj, kv_scale_HR)


def qk_clip_(attentions: Sequence[nn.Module], layout: MLAHeadLayout, max_logits_LH: Tensor, tau: float) -> int:
    """Applies QK-Clip to every layer and returns the number of clipped heads."""
    expected = (len(attentions), layout.num_heads)
    if tuple(max_logits_LH.shape) != expected:
        raise ValueError(f"max_attention_logits has shape {tuple(max_logits_LH.shape)}, want {expected}")
    if math.isinf(tau):
        return 0
    gamma_LH = clip_factors(max_logits_LH.detach(), tau)
    clipped_LH = gamma_LH < 1
    for attn, gamma_H, clipped_H in zip(attentions, gamma_LH, clipped_LH, strict=True):
        if bool(clipped_H.any()):
            own_rule = getattr(attn, "clip_heads_", None)  # GQA's shared-key rule (k2_workers.model.gqa)
            if callable(own_rule):
                own_rule(gamma_H)
            else:
                apply_qk_clip_(attn, gamma_H, layout)
    return int(clipped_LH.sum())
