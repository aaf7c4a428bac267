"""Skewed traffic that keeps the balancer busy: for each candidate prompt, the experts its tokens take (counted by
running the served checkpoint here, with the same routers), and for the placement in force, the candidate it
serves worst. Each phase of traffic then needs a new placement, instead of one that happens to suit it already.

Prompts repeat one byte (the serving ranks' tokenizer is bytes), so every token of a prompt takes nearly the same
experts: a clearly skewed load."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from k2_api import ExpertPlacement
from k2_eplb.convert import placement_array
from k2_eplb.planner import mean_balancedness

Load = npt.NDArray[np.float64]
PROMPT_BYTES = 160
CANDIDATES = tuple(c * PROMPT_BYTES for c in string.ascii_lowercase + string.digits)


def expert_loads(checkpoint: Path, prompts: Sequence[str]) -> dict[str, Load]:
    """prompt -> [MoE layer, expert] token-slot counts of one forward pass over the prompt's bytes."""
    import torch

    from k2_workers.model import load_pretrained
    from k2_workers.model.router import TopkRouter, tokens_per_expert

    model = load_pretrained(checkpoint).eval()
    routers = [m for m in model.modules() if isinstance(m, TopkRouter)]
    counts: list[Any] = []
    hooks = [
        router.register_forward_hook(
            lambda module, _inputs, routing: counts.append(
                tokens_per_expert(routing.expert_ids_TK, module.config.n_routed_experts)
            )
        )
        for router in routers
    ]
    loads = {}
    try:
        with torch.no_grad():
            for prompt in prompts:
                counts.clear()
                model(torch.tensor([list(prompt.encode())]))
                loads[prompt] = np.stack([c.numpy() for c in counts]).astype(np.float64)
    finally:
        for hook in hooks:
            hook.remove()
    return loads


def worst_served(loads: Mapping[str, Load], placement: Mapping[str, Any], exclude: str | None = None) -> str:
    """The prompt whose load the placement balances worst (lowest mean balancedness over layers)."""
    placement_LGS = placement_array(ExpertPlacement.model_validate(placement))
    scores = {p: mean_balancedness(load, placement_LGS) for p, load in loads.items() if p != exclude}
    return min(scores, key=lambda p: scores[p])


class Phases:
    """The prompt of each traffic phase: the one the placement in force serves worst, never the same twice in a row."""

    def __init__(self, loads: Mapping[str, Load]) -> None:
        self.loads = dict(loads)
        self.current: str | None = None

    def next(self, placement: Mapping[str, Any]) -> str:
        self.current = worst_served(self.loads, placement, exclude=self.current)
        return self.current
