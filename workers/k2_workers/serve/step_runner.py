"""The tensor work of one step of the continuous batch, the same on every rank of a group.

The rows that feed one token (decoding sequences) share one forward [W1, 1]; each row that feeds a prefill chunk
gets a forward [1, S] of its own, of which only the last position goes through the output head. Padding never
passes through the model (nor through the MoE routers, whose counts feed the load balancer). Every rank makes the
same forwards in the same order (decoding rows first, then the chunks in row order), hence the same all-to-all
calls. (Packing the chunks into one batch row with a block-diagonal mask saves forwards but not time on CPU: seven
70-token chunks took 111 ms packed against 42 ms one by one on k2-debug, the masked attention over every chunk's
keys costing more than the forwards saved.)

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
    for i in chunks:
        view = pool.view([step.tables[i]], [step.starts[i]], len(step.tokens[i]))
        ids_1S = torch.tensor([step.tokens[i]], dtype=torch.long, device=device)
        hidden_1SD = model.model(ids_1S, cache=view)
        logits_WV[i] = model.lm_head(hidden_1SD[0, -1]).float()
    return logits_WV
