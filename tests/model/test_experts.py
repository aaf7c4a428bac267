"""The grouped routed-experts computation equals a per-token brute force, in both implementations, with gradients,
and for a module that holds only some experts (slots)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2_workers.model.experts import RoutedExperts, grouped_swiglu, looped_swiglu

T, D, F_, E, K = 40, 16, 8, 6, 3  # tokens, hidden, expert intermediate, experts, top-k


def _module(expert_ids: list[int] | None = None, implementation: str = "loop") -> RoutedExperts:
    torch.manual_seed(0)
    experts = RoutedExperts(E, D, F_, expert_ids=expert_ids, implementation=implementation)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in (experts.gate_proj, experts.up_proj, experts.down_proj):
            p.normal_(0.0, 0.3)
    return experts


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:5] = torch.tensor([0, 1, 2])  # expert 5 may be empty, 0..2 crowded
    weights = torch.rand(T, K, generator=g)
    return x, ids, weights


def _brute_force(experts: RoutedExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e not in experts.expert_ids:
                continue
            s = experts.expert_ids.index(e)
            h = F.silu(experts.gate_proj[s] @ x[t]) * (experts.up_proj[s] @ x[t])
            out[t] += w[t, k] * (experts.down_proj[s] @ h)
    return out


@pytest.mark.parametrize("implementation", ["loop", "padded", "grouped_mm"])
def test_matches_brute_force(implementation: str) -> None:
    experts = _module(implementation=implementation)
    x, ids, w = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, w), _brute_force(experts, x, ids, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["loop", "padded"])
@pytest.mark.parametrize("skewed", [False, True])
def test_gradients_match_brute_force(implementation: str, skewed: bool) -> None:
    experts = _module(implementation=implementation)
    x, ids, w = _inputs()
    if skewed:  # experts 0..2 get >= 36 of the 120 assignments, above the padded capacity 30: overflow path
        ids[:36, 0] = 0
        ids[:36, 1:] = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, w), _brute_force(experts, x, ids, w), atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    w.requires_grad_(True)
    experts(x, ids, w).square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, experts.gate_proj, experts.down_proj)]  # type: ignore[union-attr]
    for t in (x, w, experts.gate_proj, experts.down_proj):
        t.grad = None
    _brute_force(experts, x, ids, w).square().sum().backward()
    for got, t in zip(grads, (x, w, experts.gate_proj, experts.down_proj), strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-4)


def test_padded_grouped_gemm_equals_loop() -> None:
    """The CUDA path pads each expert's rows to an alignment; check that bookkeeping on CPU."""
    experts = _module()
    x, ids, _ = _inputs()
    slots = ids.reshape(-1)
    order = slots.argsort(stable=True)
    x_sorted = x[order // K]
    counts = torch.bincount(slots, minlength=E)
    args = (experts.gate_proj, experts.up_proj, experts.down_proj)
    with torch.no_grad():
        expected = looped_swiglu(x_sorted, counts, *args)
        torch.testing.assert_close(grouped_swiglu(x_sorted, counts, *args, align=4), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grouped_swiglu(x_sorted, counts, *args, align=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["loop", "padded"])
def test_subset_of_experts_computes_its_share(implementation: str) -> None:
    experts = _module(expert_ids=[4, 1, 4], implementation=implementation)
    assert experts.gate_proj.shape == (3, F_, D)
    x, ids, w = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, w), _brute_force(experts, x, ids, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert_ids"):
        RoutedExperts(E, D, F_, expert_ids=[6])
