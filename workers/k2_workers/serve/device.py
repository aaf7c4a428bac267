"""Where a serving rank computes: the collective backend and the device, chosen together.

With CUDA, the group runs nccl and everything the collectives touch (the model, the broadcast tensors, the
exchanged expert weights) lives on the rank's GPU, `cuda:LOCAL_RANK` (one rank per pod: cuda:0); nccl cannot
move CPU tensors. Without CUDA, gloo on the CPU. The choice is made once, here, as pure functions.
"""

from __future__ import annotations

import torch

NCCL = "nccl"
GLOO = "gloo"


def group_backend(cuda_available: bool) -> str:
    """nccl when the rank has a GPU, gloo otherwise (a one-rank group too: its all-to-all runs on that device)."""
    return NCCL if cuda_available else GLOO


def serving_device(backend: str, local_rank: int = 0) -> torch.device:
    """The device that `backend`'s collectives take tensors on."""
    if backend == NCCL:
        if local_rank < 0:
            raise ValueError(f"LOCAL_RANK: must be >= 0, got {local_rank}")
        return torch.device("cuda", local_rank)
    if backend == GLOO:
        return torch.device("cpu")
    raise ValueError(f"backend: {backend!r} is neither {NCCL} nor {GLOO}")


def serving_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (whose bf16 matmuls are slow)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
