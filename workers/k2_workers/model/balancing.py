"""The auxiliary-loss-free load-balancing rule (DeepSeek-V3 §2.1.2) on one bias, or on every router of a model.

Each expert's correction bias moves by u towards balance: b += u·sign(mean load − load), then is recentred to mean 0.
The bias only steers which experts are chosen (`router.route`); it never enters the combine weights.

Shape legend: E = routed experts, L = MoE layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from k2_workers.model.model import K2ForCausalLM


@torch.no_grad()
def loss_free_bias_update(bias: Tensor, tokens_per_expert: Tensor, u: float = 1e-3) -> Tensor:
    """Updates `bias` [E] (or [L, E]) in place from the tokens each expert received, of the same shape; returns it."""
    if bias.shape != tokens_per_expert.shape:
        raise ValueError(f"tokens_per_expert: shape {tuple(tokens_per_expert.shape)} != bias shape {tuple(bias.shape)}")
    load = tokens_per_expert.to(torch.float32)
    bias += u * torch.sign(load.mean(dim=-1, keepdim=True) - load).to(bias.dtype)
    bias -= bias.mean(dim=-1, keepdim=True)
    return bias


@torch.no_grad()
def update_router_biases(model: K2ForCausalLM, tokens_per_expert_LE: Tensor, u: float = 1e-3) -> Tensor:
    """Applies the rule to each MoE router's correction bias, row i of `tokens_per_expert_LE` to MoE layer i (as
    `model.expert_token_counts()` orders them). Returns the new biases [L, E] (empty for routers without a bias)."""
    biases = [moe.gate.e_score_correction_bias for moe in model.moe_blocks()]
    held = [bias_E for bias_E in biases if bias_E is not None]
    if not held:
        return torch.empty(0)
    expected = (len(held), held[0].shape[0])
    if tuple(tokens_per_expert_LE.shape) != expected:
        raise ValueError(f"tokens_per_expert_LE: expected shape {expected}, got {tuple(tokens_per_expert_LE.shape)}")
    for bias_E, load_E in zip(held, tokens_per_expert_LE, strict=True):
        loss_free_bias_update(bias_E, load_E.to(bias_E.device), u)
    return torch.stack(held)
