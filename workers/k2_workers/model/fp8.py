"""DeepSeek-V3 block-wise FP8 weights: `float8_e4m3fn` values with an fp32 `weight_scale_inv` per 128x128 block.

`w = w_fp8 · scale_inv[block]`; the last block row/column may be partial (the padded remainder is dropped).
Shape legend: O = output rows, I = input columns, Ob/Ib = block rows/columns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
DEFAULT_BLOCK = (128, 128)


def _expand_blocks(scale_ObIb: Tensor, shape: tuple[int, int], block: tuple[int, int]) -> Tensor:
    rows, cols = shape
    return scale_ObIb.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]


def dequantize_fp8(
    w_OI: Tensor, scale_inv_ObIb: Tensor, block: tuple[int, int] = DEFAULT_BLOCK, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The dense weight of a block-quantised FP8 weight (computed in fp32, returned in `dtype`)."""
    rows, cols = w_OI.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv_ObIb.shape) != expected:
        raise ValueError(
            f"scale_inv: expected shape {expected} for a {tuple(w_OI.shape)} weight, got {tuple(scale_inv_ObIb.shape)}"
        )
    scale_OI = _expand_blocks(scale_inv_ObIb.float(), (rows, cols), block)
    return (w_OI.float() * scale_OI).to(dtype)


def quantize_fp8(w_OI: Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """Block-quantise a 2-D weight to e4m3 with one scale per block (each block's max maps to 448)."""
    rows, cols = w_OI.shape
    rb, cb = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = w_OI.float().new_zeros(rb * block[0], cb * block[1])
    padded[:rows, :cols] = w_OI.float()
    amax_ObIb = padded.view(rb, block[0], cb, block[1]).abs().amax(dim=(1, 3))
    scale_inv_ObIb = (amax_ObIb / FP8_MAX).clamp(min=1e-12)
    w_fp8 = (w_OI.float() / _expand_blocks(scale_inv_ObIb, (rows, cols), block)).to(FP8_DTYPE)
    return w_fp8, scale_inv_ObIb
