"""The tensor work of one step of the continuous batch, the same on every rank of a group.

A step is at most two forwards, whatever the number of sequences: the rows that feed one token (decoding ones) as a
forward [W1, 1] over a `PagedView`, and the rows that feed a prefill chunk packed into one batch row [1, N] over a
`PackedView`, of which only each row's last position goes through the output head. (Packing the decoding rows
too would save a forward but make every decoding token attend over the chunks' keys, masked: more work than it
saves.) Padding never passes through the model (nor through the MoE routers, whose counts feed the load
balancer). Every rank runs the same step, hence the same forwards and the same all-to-all calls.

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
    logits_WV = torch.empty(len(step.tokens), model.config.vocab_size, device=device)
    single = [i for i, tokens in enumerate(step.tokens) if len(tokens) == 1]
    chunks = [i for i, tokens in enumerate(step.tokens) if len(tokens) > 1]
    if single:
        view = pool.view([step.tables[i] for i in single], [step.starts[i] for i in single], 1)
        ids_W1 = torch.tensor([step.tokens[i] for i in single], dtype=torch.long, device=device)
        logits_WV[single] = model(ids_W1, cache=view).logits[:, -1].float()
    if chunks:
        lengths = [len(step.tokens[i]) for i in chunks]
        packed = pool.packed_view([step.tables[i] for i in chunks], [step.starts[i] for i in chunks], lengths)
        ids_1N = torch.tensor([[t for i in chunks for t in step.tokens[i]]], dtype=torch.long, device=device)
        hidden_1ND = model.model(ids_1N, cache=packed)
        logits_WV[chunks] = model.lm_head(hidden_1ND[0, packed.last_B]).float()
    return logits_WV
