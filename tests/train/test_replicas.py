"""The replica check that guards data parallelism (weights and router biases identical on every rank)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import spawn

from tests.support.loopback_group import init_loopback_group
from tests.support.ports import free_port

pytestmark = pytest.mark.distributed


def _rank(rank: int, port: int, perturb: bool, results: dict[int, str]) -> None:
    from k2_workers.train.distributed import check_replicas_identical

    init_loopback_group(rank, 2, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    bias = torch.zeros(4)
    if perturb and rank == 1:
        bias[2] += 1e-3
    model.register_buffer("e_score_correction_bias", bias)
    try:
        check_replicas_identical(model)
        results[rank] = "ok"
    except RuntimeError as error:
        results[rank] = str(error)
    dist.destroy_process_group()


@pytest.mark.parametrize("perturb", [False, True])
def test_diverged_router_bias_is_detected(perturb: bool) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        spawn(_rank, args=(free_port(), perturb, results), nprocs=2, join=True)  # type: ignore[no-untyped-call]
        outcome = dict(results)
    if perturb:
        assert all("e_score_correction_bias differs" in outcome[r] for r in (0, 1)), outcome
    else:
        assert outcome == {0: "ok", 1: "ok"}
