"""Rotary position embedding for MLA's decoupled rope dims (or a whole GQA head): plain RoPE or YaRN, and the YaRN
softmax-scale correction.

The frequencies follow DeepSeek-V3 `precompute_freqs_cis` (= transformers' `_compute_yarn_parameters` with truncation):
pairs below the correction range keep θ_i = base^(-2i/d), pairs above it are divided by `factor`, with a linear ramp
between. Shape legend: B = batch, S = sequence, R = rope dims, P = R/2 rotary pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from k2_workers.model.config import K2Config


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_positions: int) -> float:
    return dim * math.log(max_positions / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(config: K2Config) -> tuple[Tensor, float]:
    """Inverse frequencies [P] (fp32) and the multiplier applied to cos/sin."""
    dim, base = config.rope_head_dim, config.rope_theta
    pos_freqs_P = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / pos_freqs_P, 1.0

    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32.0)
    beta_slow = float(scaling.get("beta_slow") or 1.0)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        cos_sin_scale = float(scaling["attention_factor"])
    elif mscale and mscale_all_dim:
        cos_sin_scale = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all_dim))
    else:
        cos_sin_scale = yarn_mscale(factor)

    low = _correction_dim(beta_fast, dim, base, original)
    high = _correction_dim(beta_slow, dim, base, original)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp_P = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_P = 1 - ramp_P  # 1: keep the original frequency (high-frequency pairs), 0: interpolate by `factor`
    inv_freq_P = (1.0 / (factor * pos_freqs_P)) * (1 - keep_P) + (1.0 / pos_freqs_P) * keep_P
    return inv_freq_P, cos_sin_scale


def softmax_scale(config: K2Config) -> float:
    """The attention logit scale: qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)² under YaRN."""
    scale = 1.0 / math.sqrt(config.qk_head_dim)
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Maps position ids to the (cos, sin) tables of the rope dims."""

    inv_freq_P: Tensor

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        inv_freq_P, self.cos_sin_scale = rope_frequencies(config)
        self.register_buffer("inv_freq_P", inv_freq_P, persistent=False)
        self._config = config

    def reset_buffers(self) -> None:
        """Recompute the frequencies (after `to_empty` from the meta device)."""
        inv_freq_P, _ = rope_frequencies(self._config)
        self.inv_freq_P = inv_freq_P.to(self.inv_freq_P.device)

    @torch.no_grad()
    def forward(self, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, each [B, S, P], computed in fp32 then cast to `dtype`."""
        angles_BSP = position_ids_BS[..., None].float() * self.inv_freq_P.float()
        cos, sin = angles_BSP.cos() * self.cos_sin_scale, angles_BSP.sin() * self.cos_sin_scale
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos_BSP: Tensor, sin_BSP: Tensor, interleaved: bool = True) -> Tensor:
    """Rotate x [B, H, S, R] (or [B, S, R] with H absent) by the angles of its positions.

    With `interleaved` the pairs are (x[2i], x[2i+1]) as in DeepSeek's checkpoints; otherwise (x[i], x[i+P]). The
    output lists the first members of all pairs, then the second members: q and k get the same order, so q·k is
    unchanged, and this is the order transformers produces.
    """
    if x.dim() == 4:
        cos_BSP, sin_BSP = cos_BSP[:, None], sin_BSP[:, None]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos_BSP - x2 * sin_BSP, x2 * cos_BSP + x1 * sin_BSP], dim=-1)
