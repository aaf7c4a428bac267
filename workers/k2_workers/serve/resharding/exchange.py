"""Send and receive expert weights between the ranks of a serving group (the I/O half of `plan`).

One message per move: the expert's gate, up and down projections packed into one flat buffer. All sends and
receives of a layer are posted together (`batch_isend_irecv`), in the order of the planned moves, which every rank
computed identically, so no pair of ranks waits on the other. Works with gloo and nccl.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from k2_workers.serve.resharding.plan import ExpertMove

ExpertTriple = tuple[Tensor, Tensor, Tensor]  # gate [I, D], up [I, D], down [D, I] of one expert


def exchange_experts(
    moves: Sequence[ExpertMove],
    rank: int,
    local_expert: Callable[[int], ExpertTriple],
    intermediate: int,
    hidden: int,
    like: Tensor,
) -> dict[int, ExpertTriple]:
    """Post this rank's sends (taking weights from `local_expert`) and receives; return the received experts.

    Received buffers get `like`'s dtype and device; the senders' weights must have the same dtype.
    """
    ops: list[dist.P2POp] = []
    inbox: dict[int, Tensor] = {}
    for tag, move in enumerate(moves):
        if move.source == rank:
            packed = torch.cat([w.reshape(-1) for w in local_expert(move.expert)])
            ops.append(dist.P2POp(dist.isend, packed, move.target, tag=tag))
        elif move.target == rank:
            inbox[move.expert] = like.new_empty(3 * intermediate * hidden)
            ops.append(dist.P2POp(dist.irecv, inbox[move.expert], move.source, tag=tag))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return {expert: _unpack(flat, intermediate, hidden) for expert, flat in inbox.items()}


def _unpack(flat: Tensor, intermediate: int, hidden: int) -> ExpertTriple:
    gate, up, down = torch.split(flat, intermediate * hidden)
    return gate.view(intermediate, hidden), up.view(intermediate, hidden), down.view(hidden, intermediate)
