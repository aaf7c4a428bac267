"""Batched Newton–Schulz orthogonalisation, the core of Muon.

Shape legend: B = batch of matrices (experts, or same-shaped weights of several layers), M/N = matrix rows/cols.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Quintic coefficients (a, b, c) with a steep slope at zero (Keller Jordan; Moonlight and torch.optim.Muon use them).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
#: Lower bound of the Frobenius norm we divide by (torch.optim.Muon's EPS).
NS_EPS = 1e-7


def zeropower_via_newton_schulz(
    g_BMN: Tensor,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalise every matrix of a stack ``[B, M, N]`` (or a single ``[M, N]``) in one batched pass.

    Each matrix is divided by its Frobenius norm, transposed when tall so the Gram matrix is the small one, and run
    through ``steps`` iterations of ``X <- a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ``. The arithmetic mirrors
    ``torch.optim.Muon`` (computation in ``dtype``, bf16 by default) so a batch of one gives the same result.
    Returns a tensor of ``g_BMN``'s shape in ``dtype``.
    """
    if g_BMN.ndim not in (2, 3):
        raise ValueError(f"g_BMN must be 2-D or 3-D, got shape {tuple(g_BMN.shape)}")
    a, b, c = coefficients
    x = g_BMN.to(dtype=dtype)  # not modified in place: no copy needed
    squeeze = x.ndim == 2
    if squeeze:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x.squeeze(0) if squeeze else x
