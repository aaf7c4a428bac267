"""The choice of collective backend and device (pure): with CUDA, nccl with the model and every collective tensor on
the rank's GPU; without, gloo on the CPU. The GPU path itself needs a GPU, which this machine lacks: these tests pin
the choice, and the serving tests run the CPU path end to end."""

from __future__ import annotations

import pytest
import torch

from k2_workers.serve.device import group_backend, serving_device, serving_dtype
from k2_workers.serve.wire import RankWire


def test_with_cuda_the_group_runs_nccl_on_the_ranks_gpu() -> None:
    backend = group_backend(cuda_available=True)
    assert backend == "nccl"
    assert serving_device(backend) == torch.device("cuda", 0)
    assert serving_device(backend, local_rank=3) == torch.device("cuda", 3)
    assert serving_dtype(serving_device(backend)) == torch.bfloat16


def test_without_cuda_the_group_runs_gloo_on_the_cpu() -> None:
    backend = group_backend(cuda_available=False)
    assert backend == "gloo"
    assert serving_device(backend, local_rank=3) == torch.device("cpu")
    assert serving_dtype(serving_device(backend)) == torch.float32


def test_an_unknown_backend_or_a_negative_local_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        serving_device("mpi")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        serving_device("nccl", local_rank=-1)


def test_the_wire_is_on_the_device_it_was_given() -> None:
    assert RankWire(world_size=1, num_experts=4, device="cpu").device == torch.device("cpu")
    assert RankWire(world_size=2, num_experts=4, device="cuda:1").device == torch.device("cuda", 1)
