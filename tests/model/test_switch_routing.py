"""Switch-style routing: top-1 with an expert capacity, overflow dropped in routing order (the token keeps only its
residual) and counted, and the Switch auxiliary loss (alpha = 1e-2) that falls as the load balances."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.model.moe import MoE
from k2_workers.model.router import switch_aux_loss
from k2_workers.model.switch import (
    SWITCH_AUX_LOSS_ALPHA,
    capacity_mask,
    expert_capacity,
    switch_routing,
)


def switch_config(capacity_factor: float = 1.25) -> K2Config:
    return switch_routing(K2Config.from_preset("mixtral-debug"), capacity_factor)


def test_capacity_is_capacity_factor_times_tokens_over_experts() -> None:
    assert expert_capacity(num_tokens=10, top_k=1, num_experts=4, capacity_factor=1.25) == 4  # ceil(3.125)
    assert expert_capacity(num_tokens=64, top_k=1, num_experts=8, capacity_factor=1.0) == 8
    assert expert_capacity(num_tokens=64, top_k=2, num_experts=8, capacity_factor=1.0) == 16  # per assignment


def test_top1_overflow_is_dropped_in_token_order() -> None:
    ids_T1 = torch.tensor([[0], [0], [0], [1], [0], [2], [0]])
    keep = capacity_mask(ids_T1, num_experts=4, capacity=2)
    assert keep[:, 0].tolist() == [True, True, False, True, False, True, False]


def test_top2_first_choices_go_before_second_choices() -> None:
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 2]])
    keep = capacity_mask(ids_TK, num_experts=3, capacity=1)
    # first choices in token order: 0->0 kept, 1->1 kept, 2->0 dropped; then seconds: 0->1 and 1->0 dropped, 2->2 kept
    assert keep.tolist() == [[True, False], [True, False], [False, True]]


@pytest.mark.parametrize("top_k", [1, 2])
def test_each_expert_keeps_exactly_its_first_capacity_assignments(top_k: int) -> None:
    generator = torch.Generator().manual_seed(3)
    weights = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.5])  # skewed
    ids_TK = torch.stack([torch.multinomial(weights, top_k, generator=generator) for _ in range(200)])
    capacity = expert_capacity(200, top_k, 6, 1.0)
    keep = capacity_mask(ids_TK, 6, capacity)
    routing_order = ids_TK.t().reshape(-1)
    kept_in_order = keep.t().reshape(-1)
    for e in range(6):
        mine = kept_in_order[routing_order == e]
        assert int(mine.sum()) == min(capacity, mine.numel())
        assert mine.tolist() == sorted(mine.tolist(), reverse=True)  # the first ones kept, the overflow dropped


def test_dropped_tokens_pass_through_on_the_residual_and_are_counted() -> None:
    config = switch_config(capacity_factor=1.0)
    torch.manual_seed(0)
    moe = MoE(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
        moe.gate.weight.zero_()
        moe.gate.weight[3, 0] = 10.0  # every token with x[:, 0] > 0 goes to expert 3
    x_TD = torch.randn(1, 64, config.hidden_size, generator=torch.Generator().manual_seed(1))
    x_TD[..., 0] = x_TD[..., 0].abs() + 0.1
    with torch.no_grad():
        capped = moe(x_TD)[0]
        uncapped_moe = MoE(dataclasses.replace(config, capacity_factor=None)).eval()
        uncapped_moe.load_state_dict(moe.state_dict())
        uncapped = uncapped_moe(x_TD)[0]
    capacity = expert_capacity(64, 1, config.n_routed_experts, 1.0)  # 8 of 64 tokens
    assert int(moe.last_dropped) == 64 - capacity
    assert torch.allclose(capped[:capacity], uncapped[:capacity], atol=1e-6)  # the first 8 in token order computed
    assert torch.equal(capped[capacity:], torch.zeros_like(capped[capacity:]))  # the rest add nothing
    assert int(moe.last_tokens_per_expert_E[3]) == 64  # the load counts the router's choices


def test_the_model_reports_its_dropped_token_rate() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM(switch_config(capacity_factor=0.5)).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids)
    counts = model.dropped_token_counts()
    assert counts.shape == (model.config.num_hidden_layers,)
    assert (counts >= 40).all()  # capacity 0.5: at least half of the 80 tokens dropped in every layer
    assert model.dropped_token_rate() == pytest.approx(float(counts.sum()) / (3 * 80))

    roomy = K2ForCausalLM(switch_config(capacity_factor=8.0)).eval()  # room for every token at every expert
    roomy.load_state_dict(model.state_dict())
    free = K2ForCausalLM(dataclasses.replace(switch_config(), capacity_factor=None)).eval()
    free.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(roomy(ids).logits, free(ids).logits)
    assert roomy.dropped_token_rate() == 0.0


def test_top1_router_learns_from_the_task_loss() -> None:
    """Switch scales the expert output by its probability, so the router gets gradient from the loss itself."""
    torch.manual_seed(0)
    model = K2ForCausalLM(switch_config()).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    model(ids, labels=ids).loss.backward()  # type: ignore[union-attr]
    assert all(moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().max() > 0 for moe in model.moe_blocks())


def test_aux_loss_is_alpha_when_balanced_and_larger_when_not() -> None:
    num_experts, tokens = 8, 64
    uniform_TE = torch.full((tokens, num_experts), 1 / num_experts)
    balanced_T1 = (torch.arange(tokens) % num_experts)[:, None]
    assert switch_aux_loss(uniform_TE, balanced_T1, SWITCH_AUX_LOSS_ALPHA).item() == pytest.approx(1e-2)
    skewed_TE = torch.softmax(torch.tensor([4.0] + [0.0] * 7).expand(tokens, -1), dim=-1)
    skewed_T1 = torch.zeros(tokens, 1, dtype=torch.long)
    assert switch_aux_loss(skewed_TE, skewed_T1, SWITCH_AUX_LOSS_ALPHA).item() > 5e-2


def test_aux_loss_falls_as_the_router_balances() -> None:
    """Minimising the aux loss alone moves a skewed router towards balance: the loss and the top load both fall."""
    generator = torch.Generator().manual_seed(5)
    x_TD = torch.randn(256, 16, generator=generator)
    x_TD[:, 0] += 2.0  # a feature every token shares ...
    weight = torch.randn(8, 16, generator=generator) * 0.1
    weight[0, 0] += 1.0  # ... that expert 0 likes: it gets about 90% of the tokens
    weight.requires_grad_(True)
    optimizer = torch.optim.SGD([weight], lr=1.0)

    def loss_and_top_load() -> tuple[torch.Tensor, float]:
        probs_TE = torch.softmax(x_TD @ weight.t(), dim=-1)
        ids_T1 = probs_TE.argmax(dim=-1, keepdim=True)
        top = torch.bincount(ids_T1[:, 0], minlength=8).max().item() / 256
        return switch_aux_loss(probs_TE, ids_T1, SWITCH_AUX_LOSS_ALPHA), top

    first_loss, first_top = loss_and_top_load()
    assert first_top > 0.8 and first_loss.item() > 3 * SWITCH_AUX_LOSS_ALPHA
    for _ in range(100):
        optimizer.zero_grad()
        loss_and_top_load()[0].backward()
        optimizer.step()
    last_loss, last_top = loss_and_top_load()
    assert last_loss.item() < first_loss.item()
    assert last_top < 0.25  # from ~0.9 to near the balanced 1/8
    assert last_loss.item() < 1.5 * SWITCH_AUX_LOSS_ALPHA  # near the balanced value alpha


def test_switch_routing_recipe() -> None:
    c = switch_config()
    assert (c.num_experts_per_tok, c.scoring_func, c.norm_topk_prob) == (1, "softmax", False)
    assert (c.capacity_factor, c.aux_loss_alpha) == (1.25, 1e-2)
    assert c.attention_type == "gqa"  # only the router changes
