"""The MoE feed-forward block: router (`gate`), routed experts (`experts`) and shared experts (`shared_experts`).

It keeps, from its last forward, the tokens routed to each logical expert (for the loss-free bias update and the
EPLB load exporter: the router's choices, before any capacity), the assignments dropped for capacity (Switch-style,
when `capacity_factor` is set; see `switch`) and, in training, the router's auxiliary balance loss.

Shape legend: B = batch, S = sequence, T = B·S tokens, D = hidden, E = routed experts, K = experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from k2_workers.model.config import K2Config
from k2_workers.model.experts import RoutedExperts
from k2_workers.model.mlp import SwiGLU
from k2_workers.model.router import TopkRouter, switch_aux_loss, tokens_per_expert
from k2_workers.model.switch import capacity_mask, expert_capacity


class MoE(nn.Module):
    last_tokens_per_expert_E: Tensor
    last_dropped: Tensor

    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.gate = TopkRouter(config)
        self.experts: nn.Module = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )
        self.register_buffer(
            "last_tokens_per_expert_E", torch.zeros(config.n_routed_experts, dtype=torch.long), persistent=False
        )
        self.register_buffer("last_dropped", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_assignments = 0  # T·K of the last forward
        self.last_aux_loss: Tensor | None = None

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.gate(x_TD)
        with torch.no_grad():
            self.last_tokens_per_expert_E = tokens_per_expert(routing.expert_ids_TK, self.config.n_routed_experts)
        self.last_aux_loss = (
            switch_aux_loss(routing.probs_TE, routing.expert_ids_TK)
            if self.training and torch.is_grad_enabled()
            else None
        )
        self.last_assignments = routing.expert_ids_TK.numel()
        if self.config.capacity_factor is None:
            y_TD: Tensor = self.experts(x_TD, routing.expert_ids_TK, routing.expert_weights_TK)
        else:
            y_TD = self._capped_experts(x_TD, routing.expert_ids_TK, routing.expert_weights_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view_as(x_BSD)

    def _capped_experts(self, x_TD: Tensor, expert_ids_TK: Tensor, expert_weights_TK: Tensor) -> Tensor:
        """The routed experts on the assignments within capacity only, each as a top-1 row; dropped ones add 0."""
        t, k = expert_ids_TK.shape
        num_experts = self.config.n_routed_experts
        assert self.config.capacity_factor is not None
        capacity = expert_capacity(t, k, num_experts, self.config.capacity_factor)
        with torch.no_grad():
            keep_TK = capacity_mask(expert_ids_TK, num_experts, capacity)
            self.last_dropped = (~keep_TK).sum()
        token_A, choice_A = keep_TK.nonzero(as_tuple=True)
        ids_A1 = expert_ids_TK[token_A, choice_A][:, None]
        weights_A1 = expert_weights_TK[token_A, choice_A][:, None]
        y_AD: Tensor = self.experts(x_TD[token_A], ids_A1, weights_A1)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))
