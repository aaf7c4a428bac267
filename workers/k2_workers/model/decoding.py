"""Autoregressive decoding with the attention's cache (MLA latent or GQA keys and values): greedy, or sampled with
temperature / top-k / top-p.

The prompt is prefilled in one forward, then one token per step attends to the cached latents. `generate_batch`
decodes prompts of different lengths together: each is prefilled alone, their caches are joined right-aligned
(`TokenCache.join`), and every step is one forward for all of them, so padding never passes through the model (nor
through the MoE routers, whose token counts feed the load balancer).
Shape legend: B = batch, S = prompt length, N = new tokens, V = vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from k2_workers.model.kv_cache import KVCache, join_caches, new_cache
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
    cache = new_cache(model.config, batch, prompt_len + max_new_tokens, device=input_ids.device, dtype=dtype)
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


Sampler = Callable[[Tensor], Tensor]  # one row's logits [1, V] -> its next token [1]


@torch.no_grad()
def generate_batch(
    model: K2ForCausalLM,
    prompts: Sequence[Tensor],
    max_new_tokens: int,
    samplers: Sequence[Sampler] | None = None,
    *,
    prefill_chunk: int | None = None,
) -> list[Tensor]:
    """Exactly `max_new_tokens` new ids for each 1-D prompt, decoded as one batch; `samplers[i]` picks row i's
    tokens (default: greedy), so each request keeps its own temperature and random generator. With
    `prefill_chunk`, a prompt is prefilled `prefill_chunk` tokens per forward (each chunk attends to the cached
    ones), so prefill attention holds at most heads x chunk x prompt logits per layer, whatever the prompt."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts: need at least one, each a non-empty 1-D tensor of token ids")
    samplers = samplers or [sample_next] * len(prompts)
    if len(samplers) != len(prompts):
        raise ValueError(f"samplers: {len(samplers)} for {len(prompts)} prompts")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
    cache, logits_BV = prefill_batch(model, prompts, max_new_tokens, prefill_chunk=prefill_chunk)
    new_tokens: list[Tensor] = []
    for step in range(max_new_tokens):
        next_B = torch.cat([sample(logits_BV[row : row + 1]) for row, sample in enumerate(samplers)])
        new_tokens.append(next_B)
        if step + 1 < max_new_tokens:
            logits_BV = model(next_B[:, None], cache=cache).logits[:, -1]
    return list(torch.stack(new_tokens, dim=1).unbind(0))


@torch.no_grad()
def prefill_batch(
    model: K2ForCausalLM, prompts: Sequence[Tensor], max_new_tokens: int, *, prefill_chunk: int | None = None
) -> tuple[KVCache, Tensor]:
    """Each 1-D prompt prefilled alone (`prefill_chunk` tokens per forward when set), their caches joined with room
    for `max_new_tokens` more, and each prompt's last logits [B, V]: the start of a batched decode."""
    dtype, device = model.lm_head.weight.dtype, prompts[0].device
    caches: list[KVCache] = []
    last_logits: list[Tensor] = []
    for prompt in prompts:
        cache = new_cache(model.config, 1, prompt.numel(), device=device, dtype=dtype)
        for chunk in torch.split(prompt, prefill_chunk or prompt.numel()):
            logits_1SV = model(chunk[None], cache=cache).logits
        last_logits.append(logits_1SV[:, -1])
        caches.append(cache)
    joined = join_caches(caches, max(p.numel() for p in prompts) + max_new_tokens)
    return joined, torch.cat(last_logits)
