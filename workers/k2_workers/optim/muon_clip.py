"""MuonClip: Muon for hidden matrices, AdamW for the rest, QK-Clip after each step (Kimi K2 report, Algorithm 1).

Muon follows ``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` exactly for every matrix: EMA momentum with a
Nesterov look-ahead (the paper's sum-form momentum differs only by the factor 1 − μ, which the Newton–Schulz
normalisation removes), 5 Newton–Schulz steps in bf16, update scaled by 0.2·sqrt(max(rows, cols)), decoupled weight
decay ``p *= 1 − lr·wd``. The difference is speed: all matrices of the same shape (the experts of a stacked
``[E, rows, cols]`` weight, and same-shaped weights across layers) are orthogonalised in one batched call.

The optimizer is a plain :class:`torch.optim.Optimizer` with two named param groups, ``muon`` and ``adamw``, sharing
``lr`` (so LR schedulers act on both); ``state_dict()``/``load_state_dict()`` and ``torch.distributed.checkpoint``
work as for any torch optimizer. Parameters must be plain (not sharded) tensors: each rank orthogonalises the whole
local matrix, which is right under data parallelism and for expert-parallel local expert stacks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from k2_workers.optim.newton_schulz import NS_COEFFICIENTS, NS_EPS, NS_STEPS, zeropower_via_newton_schulz
from k2_workers.optim.param_groups import split_parameters
from k2_workers.optim.qk_clip import MLAHeadLayout, check_layout, find_mla_attentions, qk_clip_


def match_rms_adamw_scale(rows: int, cols: int) -> float:
    """Moonlight's update scale giving Muon updates the RMS of typical AdamW updates: 0.2·sqrt(max(rows, cols))."""
    return 0.2 * math.sqrt(max(rows, cols))


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW + per-head QK-Clip for a K2 / DeepSeek-V3 style model.

    Call ``step(max_attention_logits=S_LH)`` with ``S_LH = all_reduce_max(model.max_attention_logits())`` to clip after
    the update; ``step()`` without it only updates. ``last_clipped_heads`` is the number of heads the last step clipped.

    Args beyond the paper's (lr, weight_decay, momentum, qk_clip_tau): ``ns_*`` configure Newton–Schulz (defaults as
    torch.optim.Muon, computed in ``ns_dtype``); ``adamw_*`` the AdamW group (``adamw_weight_decay`` defaults to
    ``weight_decay``, as in Moonlight); ``head_layout`` overrides the MLA layout read from ``model.config``;
    ``max_batch_numel`` bounds the elements orthogonalised in one batched call (memory of the stacked copy).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        qk_clip_tau: float = 100.0,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        head_layout: MLAHeadLayout | None = None,
        max_batch_numel: int = 2**28,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not qk_clip_tau > 0:
            raise ValueError(f"qk_clip_tau must be > 0 (math.inf disables QK-Clip), got {qk_clip_tau}")
        if not 0 < ns_steps < 100:
            raise ValueError(f"ns_steps must be in [1, 99], got {ns_steps}")
        if not all(0 <= b < 1 for b in adamw_betas):
            raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")

        split = split_parameters(model.named_parameters())
        groups: list[dict[str, Any]] = [
            {
                "name": "muon",
                "params": [p for _, p in split["muon"]],
                "momentum": momentum,
                "nesterov": nesterov,
                "ns_steps": ns_steps,
                "ns_coefficients": tuple(ns_coefficients),
                "ns_eps": ns_eps,
            },
            {
                "name": "adamw",
                "params": [p for _, p in split["adamw"]],
                "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
                "betas": tuple(adamw_betas),
                "eps": adamw_eps,
            },
        ]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay})
        self.param_names: dict[Tensor, str] = {p: n for kind in ("muon", "adamw") for n, p in split[kind]}
        self.qk_clip_tau = qk_clip_tau
        self.ns_dtype = ns_dtype
        self.max_batch_numel = max_batch_numel
        self.last_clipped_heads = 0
        self._attentions = find_mla_attentions(model)
        self._layout: MLAHeadLayout | None = None
        if self._attentions:
            if head_layout is None and not hasattr(model, "config"):
                raise ValueError("head_layout is required for a model without a `config` attribute")
            self._layout = head_layout or MLAHeadLayout.from_config(model.config)
            check_layout(self._attentions, self._layout)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, max_attention_logits: Tensor | None = None
    ) -> float | None:
        """One update of every group, then QK-Clip when ``max_attention_logits`` [layers, heads] is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["name"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        self.last_clipped_heads = 0
        if max_attention_logits is not None:
            self.qk_clip(max_attention_logits)
        return loss

    @torch.no_grad()
    def qk_clip(self, max_attention_logits: Tensor) -> int:
        """Clips every head whose max logit exceeds ``qk_clip_tau``; returns (and records) the clipped-head count."""
        if self._layout is None:
            raise ValueError("qk_clip needs MLA attention modules (kv_b_proj, kv_a_proj_with_mqa) in the model")
        self.last_clipped_heads = qk_clip_(self._attentions, self._layout, max_attention_logits, self.qk_clip_tau)
        return self.last_clipped_heads

    def _muon_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs

        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        for bucket in _matrix_buckets(params, self.max_batch_numel):
            self._orthogonalised_update([params[i] for i in bucket], [updates[i] for i in bucket], lr, group)

    def _orthogonalised_update(
        self, params: list[Tensor], updates: list[Tensor], lr: float, group: dict[str, Any]
    ) -> None:
        """Orthogonalises a bucket of matrices with the same shape up to transposition in one batched call.

        Tall matrices are transposed into the bucket's wide orientation (Newton–Schulz would transpose them anyway),
        so e.g. expert ``gate_proj`` [E, I, D] and ``down_proj`` [E, D, I] share one call.
        """
        short, long = sorted(params[0].shape[-2:])
        counts = [math.prod(p.shape[:-2]) for p in params]
        stacked_BMN = torch.empty((sum(counts), short, long), dtype=self.ns_dtype, device=params[0].device)
        for view_BMN, update in zip(_param_views(stacked_BMN, counts, params), updates, strict=True):
            view_BMN.copy_(update.view(view_BMN.shape))
        ortho_BMN = zeropower_via_newton_schulz(
            stacked_BMN, group["ns_coefficients"], group["ns_steps"], group["ns_eps"], self.ns_dtype
        )
        alpha = -lr * match_rms_adamw_scale(short, long)
        for ortho_BMN_view, p in zip(_param_views(ortho_BMN, counts, params), params, strict=True):
            p.view(ortho_BMN_view.shape).add_(ortho_BMN_view, alpha=alpha)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _param_views(stacked_BMN: Tensor, counts: list[int], params: list[Tensor]) -> list[Tensor]:
    """Per-parameter slices of a wide-oriented stack ``[B, short, long]``, each viewed in its parameter's orientation
    (``[n, rows, cols]``; a transposed view for tall matrices)."""
    chunks = torch.split(stacked_BMN, counts)
    return [c.mT if p.size(-2) > p.size(-1) else c for c, p in zip(chunks, params, strict=True)]


def _matrix_buckets(params: list[Tensor], max_batch_numel: int) -> list[list[int]]:
    """Indices of ``params`` grouped by (matrix shape up to transposition, dtype, device), each group cut into
    chunks of at most ``max_batch_numel`` elements (a single larger parameter forms its own chunk).
    Each chunk is one batched Newton–Schulz call."""
    by_key: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_key[(tuple(sorted(p.shape[-2:])), p.dtype, p.device)].append(i)
    buckets: list[list[int]] = []
    for indices in by_key.values():
        chunk: list[int] = []
        chunk_numel = 0
        for i in indices:
            if chunk and chunk_numel + params[i].numel() > max_batch_numel:
                buckets.append(chunk)
                chunk, chunk_numel = [], 0
            chunk.append(i)
            chunk_numel += params[i].numel()
        buckets.append(chunk)
    return buckets
