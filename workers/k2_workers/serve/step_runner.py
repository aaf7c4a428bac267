"""The tensor work of one step of the continuous batch, the same on every rank of a group.

A step is one forward, so one all-to-all per MoE layer however many sequences it serves: a step of decoding rows
only (one token each) is a forward [W, 1] over a `PagedView`; a step with prefill chunks packs every row's tokens
into one batch row [1, N] over a `PackedView`, and only each row's last position goes through the output head.
Padding never passes through the model (nor through the MoE routers, whose counts feed the load balancer). Every
rank runs the same step, hence the same forward and the same all-to-all calls.

Shape legend: W = rows of the step, V = vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from k2_workers.model import K2ForCausalLM
from k2_workers.model.paged_cache import PagedPool
from k2_workers.serve.wire import Step


@torch.no_grad()
def run_step(model: K2ForCausalLM, pool: PagedPool, step: Step) -> Tensor:
    """The last logits of every row [W, V] (fp32), after its tokens were written into the pool."""
    device = pool.device
    if all(len(tokens) == 1 for tokens in step.tokens):
        ids_W1 = torch.tensor(step.tokens, dtype=torch.long, device=device)
        logits: Tensor = model(ids_W1, cache=pool.view(step.tables, step.starts, 1)).logits[:, -1]
        return logits.float()
    view = pool.packed_view(step.tables, step.starts, [len(tokens) for tokens in step.tokens])
    ids_1N = torch.tensor([[t for tokens in step.tokens for t in tokens]], dtype=torch.long, device=device)
    hidden_1ND = model.model(ids_1N, cache=view)
    last: Tensor = model.lm_head(hidden_1ND[0, view.last_B])
    return last.float()
