"""Skewed traffic for the tiny random model: a prompt that repeats one byte sends every one of its tokens to the same
experts (the tokenizer is bytes, and identical tokens route identically), so the load is as skewed as it gets. The
prompt chosen is the one the serving's first placement serves worst, found by running the ranks' model here."""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import numpy.typing as npt

from k2_api.serving import K2Serving
from k2_eplb import convert
from k2_eplb.planner import mean_balancedness
from k2_workers.ray_run.eplb_loop import initial_decision

PROMPT_BYTES = 160


def expert_loads(serving: K2Serving, prompts: list[str], seed: int = 0) -> dict[str, npt.NDArray[np.float64]]:
    """prompt -> [MoE layer, expert] tokens of one forward pass of the ranks' model (the preset's weights for
    `seed`) over it."""
    import torch

    from k2_workers.model.router import TopkRouter, tokens_per_expert
    from k2_workers.serve.rank import build_model

    model, _ = build_model(serving, None, seed, torch.device("cpu"))
    counts: list[Any] = []
    hooks = [
        router.register_forward_hook(
            lambda module, _inputs, routing: counts.append(
                tokens_per_expert(routing.expert_ids_TK, module.config.n_routed_experts)
            )
        )
        for router in model.modules()
        if isinstance(router, TopkRouter)
    ]
    loads = {}
    try:
        with torch.no_grad():
            for prompt in prompts:
                counts.clear()
                model.eval()(torch.tensor([list(prompt.encode())]))
                loads[prompt] = np.stack([c.numpy() for c in counts]).astype(np.float64)
    finally:
        for hook in hooks:
            hook.remove()
    return loads


def worst_prompt(serving: K2Serving) -> tuple[str, float]:
    """The one-byte prompt whose load the first placement balances worst, and that balancedness."""
    initial = initial_decision(convert.desired_shape(serving)).placement_LGS
    assert initial is not None
    loads = expert_loads(serving, [c * PROMPT_BYTES for c in string.ascii_lowercase])
    scores = {prompt: mean_balancedness(load, initial) for prompt, load in loads.items()}
    prompt = min(scores, key=scores.__getitem__)
    return prompt, scores[prompt]
