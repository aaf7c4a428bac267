"""MoE routers and the load-balancing rules around them.

- `noaux_tc` (DeepSeek-V3, Kimi-K2): sigmoid scores; the correction bias is added only to choose experts
  (group-limited top-k), the weights are the unbiased scores, optionally normalised, times routed_scaling_factor.
- `greedy` (Mixtral / Switch): softmax over experts, top-k, optional renormalisation.
- `group_limited_greedy` (DeepSeek-V2): as greedy, within the top groups by their best expert.
- `switch_aux_loss`: alpha·N·Σ_i f_i·P_i. The auxiliary-loss-free bias rule is in `balancing`.

Shape legend: T = tokens, D = hidden, E = routed experts, G = expert groups, K = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2_workers.model.config import K2Config


@dataclass
class Routing:
    expert_ids_TK: Tensor  # int64 logical expert ids
    expert_weights_TK: Tensor  # fp32 combine weights (scaling factor included)
    probs_TE: Tensor  # fp32 per-token expert probabilities, for the auxiliary loss


def group_limited_mask(choice_TE: Tensor, num_groups: int, topk_groups: int, group_score: str) -> Tensor:
    """Bool [T, E]: the experts of each token's `topk_groups` best groups (group score: 'top2sum' or 'max')."""
    t, e = choice_TE.shape
    grouped_TGX = choice_TE.view(t, num_groups, e // num_groups)
    top2sum = group_score == "top2sum"
    scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1) if top2sum else grouped_TGX.amax(dim=-1)
    best_TG = torch.zeros_like(scores_TG, dtype=torch.bool)
    best_TG.scatter_(1, scores_TG.topk(topk_groups, dim=-1, sorted=False).indices, True)
    return best_TG[:, :, None].expand(t, num_groups, e // num_groups).reshape(t, e)


def route(logits_TE: Tensor, config: K2Config, correction_bias_E: Tensor | None = None) -> Routing:
    """Choose experts and combine weights from fp32 router logits (a pure function of its inputs)."""
    if config.scoring_func == "sigmoid":
        scores_TE = logits_TE.sigmoid()
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    else:
        scores_TE = logits_TE.softmax(dim=-1)
        probs_TE = scores_TE
    with torch.no_grad():
        choice_TE = scores_TE.detach()
        if config.topk_method == "noaux_tc" and correction_bias_E is not None:
            choice_TE = choice_TE + correction_bias_E.float()
        if config.n_group > 1:
            score_kind = "top2sum" if config.topk_method == "noaux_tc" else "max"
            keep_TE = group_limited_mask(choice_TE, config.n_group, config.topk_group, score_kind)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        expert_ids_TK = choice_TE.topk(config.num_experts_per_tok, dim=-1, sorted=False).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if config.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(expert_ids_TK, weights_TK * config.routed_scaling_factor, probs_TE)


class TopkRouter(nn.Module):
    """`mlp.gate`: the router weight [E, D] and, for noaux_tc, the correction bias buffer [E] (fp32, no gradient)."""

    e_score_correction_bias: Tensor | None

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            return route(logits_TE, self.config, self.e_score_correction_bias)


def tokens_per_expert(expert_ids_TK: Tensor, num_experts: int) -> Tensor:
    """int64 [E]: how many (token, slot) assignments each expert received."""
    return torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)


def switch_aux_loss(probs_TE: Tensor, expert_ids_TK: Tensor, alpha: float = 1.0) -> Tensor:
    """Switch-Transformer load-balancing loss alpha·N·Σ_i f_i·P_i.

    f_i is the fraction of the T·K routed assignments that went to expert i (no gradient) and P_i the mean router
    probability of expert i; a uniform router gives alpha. With K = 1 this is exactly Switch's loss.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = tokens_per_expert(expert_ids_TK, num_experts).to(probs_TE.dtype)
    f_E = counts_E / expert_ids_TK.numel()
    p_E = probs_TE.mean(dim=0)
    return alpha * num_experts * (f_E * p_E).sum()
