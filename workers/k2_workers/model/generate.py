"""Autoregressive decoding with the MLA latent cache: greedy, or sampled with temperature / top-k / top-p.

The prompt is prefilled in one forward, then one token per step attends to the cached latents.
Shape legend: B = batch, S = prompt length, N = new tokens, V = vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from k2_workers.model.kv_cache import MLACache

if TYPE_CHECKING:
    from k2_workers.model.model import K2ForCausalLM


def sample_next(
    logits_BV: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [B]: argmax when temperature is 0, else a draw from the filtered softmax."""
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k: must be > 0, got {top_k}")
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        mass_before_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1) - sorted_BV.softmax(dim=-1)
        drop_BV = torch.zeros_like(mass_before_BV, dtype=torch.bool).scatter(1, order_BV, mass_before_BV >= top_p)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: K2ForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The prompt [B, S] followed by up to `max_new_tokens` generated tokens; a row that emitted
    `eos_token_id` is padded with it while the others continue."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids
    batch, prompt_len = input_ids.shape
    dtype = model.lm_head.weight.dtype
    cache = MLACache(model.config, batch, prompt_len + max_new_tokens, device=input_ids.device, dtype=dtype)
    logits_BSV = model(input_ids, cache=cache).logits
    tokens = [input_ids]
    done_B = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BSV[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            next_B = next_B.masked_fill(done_B, eos_token_id)
            done_B |= next_B == eos_token_id
        tokens.append(next_B[:, None])
        if step + 1 == max_new_tokens or bool(done_B.all()):
            break
        logits_BSV = model(next_B[:, None], cache=cache).logits
    return torch.cat(tokens, dim=1)
