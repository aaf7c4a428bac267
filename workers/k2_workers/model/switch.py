"""Switch-Transformer routing (Fedus et al., 2021): top-1 softmax routing with an expert capacity and token dropping.

- capacity: each expert takes at most ceil(capacity_factor · T · K / E) of a forward's T·K assignments;
- routing order: every token's first choice in token order, then every second choice, ... (for top-1 simply token
  order); an assignment is dropped when its expert already took `capacity` earlier ones. A dropped token's expert
  output is zero, so it passes through the layer on the residual alone; the MoE block counts the drops;
- balance: the auxiliary loss alpha·N·Σ f_i·P_i (`router.switch_aux_loss`), alpha = 1e-2, computed from the router's
  choices before the capacity is applied.

Shape legend: T = tokens, K = experts per token, E = routed experts.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from k2_workers.model.config import K2Config

SWITCH_AUX_LOSS_ALPHA = 1e-2
SWITCH_CAPACITY_FACTOR = 1.25


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor · tokens · top-k / experts)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_mask(expert_ids_TK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Bool [T, K]: the assignments that fit their expert's capacity, taken in routing order (choice-major)."""
    ids_A = expert_ids_TK.t().reshape(-1)  # routing order: all first choices, then all second choices, ...
    order_A = ids_A.argsort(stable=True)
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_sorted_A = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[ids_A[order_A]]
    rank_A = torch.empty_like(rank_sorted_A).scatter_(0, order_A, rank_sorted_A)  # earlier assignments, same expert
    return (rank_A < capacity).view(expert_ids_TK.shape[1], -1).t()


def switch_routing(config: K2Config, capacity_factor: float = SWITCH_CAPACITY_FACTOR) -> K2Config:
    """The config with Switch's router: softmax top-1 whose probability scales the expert output, an expert capacity,
    and the auxiliary loss weight alpha = 1e-2 (everything else unchanged)."""
    return dataclasses.replace(
        config,
        scoring_func="softmax",
        topk_method="greedy",
        num_experts_per_tok=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_group=1,
        topk_group=1,
        capacity_factor=capacity_factor,
        aux_loss_alpha=SWITCH_AUX_LOSS_ALPHA,
    )
