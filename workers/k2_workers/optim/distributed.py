"""Tiny torch.distributed helpers the optimizer's callers need."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over all ranks (e.g. per-head max attention logits across data-parallel ranks).

    Returns a new tensor; without an initialised process group it returns ``tensor`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
