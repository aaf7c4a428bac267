"""`mlp.experts`: the routed experts of one MoE layer, stored stacked, computed grouped by expert.

The (token, expert) assignments are sorted by expert so that each expert's tokens form one contiguous slice; the
SwiGLU then runs as
- `grouped_mm`: one grouped GEMM per projection (`torch._grouped_mm`, CUDA sm90+ in bf16);
- `padded`: one batched GEMM per projection over an [E, capacity, D] layout (capacity ≤ 1.5× the mean load; the
  rows of an expert beyond it get one matmul per overflowing expert), for accelerators without grouped_mm;
- `loop`: one matmul per expert that received tokens (the CPU choice). In inference the module runs it
  gather-to-scatter per expert (gather its rows, SwiGLU, scale, add into the output), so that one expert's working
  set stays in cache instead of materialising [A, D] buffers; expert parallelism, whose rows arrive gathered,
  uses `looped_swiglu`.
There is never a loop over tokens. Expert parallelism replaces this module from outside, keeping
`forward(x_TD, expert_ids_TK, expert_weights_TK) -> y_TD`.

A module may hold only some experts ("slots", e.g. an expert-parallel rank's share, replicas allowed):
`expert_ids[j]` is the logical expert in slot j; assignments to experts it does not hold contribute zero.

Shape legend: T = tokens, K = experts per token, A = held assignments (≤ T·K), D = hidden, I = expert intermediate,
E = slots (all routed experts unless a subset is held).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Implementation = Literal["auto", "grouped_mm", "padded", "loop"]
PADDED_CAPACITY_FACTOR = 1.5  # padded rows <= this × assignments
_GROUPED_MM_ALIGN_ROWS = 16  # CUDA grouped GEMM wants 16-byte aligned group starts; bf16 rows padded to 16


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert matmuls run in: bf16 under CUDA bf16 autocast, else the activations' dtype."""
    if x.is_cuda and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
        return torch.bfloat16
    return x.dtype


def grouped_mm_available(x: Tensor) -> bool:
    """Whether `torch._grouped_mm` runs this case fast: CUDA sm90+ in bf16 (its CPU version is a loop of matmuls)."""
    if not hasattr(torch, "_grouped_mm") or not x.is_cuda:
        return False
    return compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9


def choose_implementation(x: Tensor, num_rows: int, num_slots: int) -> Implementation:
    """grouped_mm where it is native; padded batched GEMMs on other accelerators (per-launch cost dominates there);
    on CPU one exact-size matmul per expert, which measured faster than the padded layout (benchmarks/moe_layer.py).

    `x` holds the activations (its device and dtype decide), `num_rows` the assignments to compute."""
    if grouped_mm_available(x):
        return "grouped_mm"
    if x.device.type != "cpu" and num_rows >= num_slots:
        return "padded"
    return "loop"


def _per_expert(counts: list[int], rows: Sequence[Tensor], weights: Sequence[Tensor]) -> Iterator[tuple[Tensor, ...]]:
    """(rows, gate, up, down) of each expert that received rows: `rows` split by `counts`, weights unbound.

    `split` and `unbind` each have one backward that concatenates or stacks; slicing `x[a:b]` or `w[e]` per expert
    instead would zero-fill a gradient of the whole tensor per expert, E of them per step."""
    pieces = [torch.split(r, counts) for r in rows]
    for n, *tensors in zip(counts, *pieces, *(w.unbind(0) for w in weights), strict=True):
        if n > 0:
            yield tuple(tensors)


def swiglu(x_ND: Tensor, gate_ID: Tensor, up_ID: Tensor, down_DI: Tensor) -> Tensor:
    """One expert's SwiGLU: down(silu(gate(x)) * up(x))."""
    return F.linear(F.silu(F.linear(x_ND, gate_ID)) * F.linear(x_ND, up_ID), down_DI)


def _pad_groups(counts_E: Tensor, align: int) -> tuple[Tensor, Tensor]:
    """Row positions of the sorted assignments inside groups padded to `align` rows, and the padded group ends."""
    padded_E = (counts_E + align - 1) // align * align
    ends_E = padded_E.cumsum(0)
    shift_E = (ends_E - padded_E) - (counts_E.cumsum(0) - counts_E)  # padded start - unpadded start
    group_A = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E)
    rows_A = torch.arange(group_A.numel(), device=counts_E.device) + shift_E[group_A]
    return rows_A, ends_E


def grouped_swiglu(
    x_AD: Tensor, counts_E: Tensor, gate_EID: Tensor, up_EID: Tensor, down_EDI: Tensor, align: int = 1
) -> Tensor:
    """SwiGLU of every expert over its contiguous rows, as three grouped GEMMs."""
    rows_A = ends_E = None
    if align > 1:
        rows_A, ends_E = _pad_groups(counts_E, align)
        x_padded = x_AD.new_zeros(int(ends_E[-1].item()) if ends_E.numel() else 0, x_AD.shape[-1])
        x_AD = x_padded.index_copy(0, rows_A, x_AD)
    else:
        ends_E = counts_E.cumsum(0)
    offs = ends_E.to(torch.int32)
    gate = torch._grouped_mm(x_AD, gate_EID.transpose(-2, -1), offs=offs)
    up = torch._grouped_mm(x_AD, up_EID.transpose(-2, -1), offs=offs)
    out = torch._grouped_mm(F.silu(gate) * up, down_EDI.transpose(-2, -1), offs=offs)
    return out if rows_A is None else out[rows_A]


def padded_swiglu(
    x_AD: Tensor,
    counts_E: Tensor,
    gate_EID: Tensor,
    up_EID: Tensor,
    down_EDI: Tensor,
    capacity_factor: float = PADDED_CAPACITY_FACTOR,
) -> Tensor:
    """SwiGLU of every expert as batched GEMMs over [E, C, D], C = min(max load, capacity_factor × mean load).

    Rows beyond an expert's first C (skewed routing) are computed with one matmul per overflowing expert.
    """
    num_experts, num_rows = counts_E.numel(), x_AD.shape[0]
    max_count = int(counts_E.max().item()) if num_experts else 0
    capacity = max(1, min(max_count, math.ceil(capacity_factor * num_rows / max(num_experts, 1))))
    starts_E = counts_E.cumsum(0) - counts_E
    expert_A = torch.repeat_interleave(torch.arange(num_experts, device=x_AD.device), counts_E)
    rank_A = torch.arange(num_rows, device=x_AD.device) - starts_E[expert_A]
    padded_A = rank_A < capacity
    rows_P = padded_A.nonzero().squeeze(-1)
    slots_P = (expert_A * capacity + rank_A)[rows_P]

    x_ECD = x_AD.new_zeros(num_experts * capacity, x_AD.shape[1]).index_copy(0, slots_P, x_AD[rows_P])
    x_ECD = x_ECD.view(num_experts, capacity, -1)
    h_ECI = F.silu(torch.bmm(x_ECD, gate_EID.transpose(1, 2))) * torch.bmm(x_ECD, up_EID.transpose(1, 2))
    y_PD = torch.bmm(h_ECI, down_EDI.transpose(1, 2)).flatten(0, 1)[slots_P]
    if max_count <= capacity:
        return y_PD.new_zeros(num_rows, y_PD.shape[1]).index_copy(0, rows_P, y_PD)

    overflow_rows, overflow_outs = [rows_P], [y_PD]
    heavy = (counts_E > capacity).nonzero().squeeze(-1).tolist()
    for e, start, count in zip(heavy, starts_E[heavy].tolist(), counts_E[heavy].tolist(), strict=True):
        rows = torch.arange(start + capacity, start + count, device=x_AD.device)
        x = x_AD[start + capacity : start + count]
        overflow_rows.append(rows)
        overflow_outs.append(swiglu(x, gate_EID[e], up_EID[e], down_EDI[e]))
    y_AD = torch.cat(overflow_outs)
    return y_AD.new_zeros(num_rows, y_AD.shape[1]).index_copy(0, torch.cat(overflow_rows), y_AD)


def looped_swiglu(x_AD: Tensor, counts_E: Tensor, gate_EID: Tensor, up_EID: Tensor, down_EDI: Tensor) -> Tensor:
    """SwiGLU of every expert over its contiguous rows, one matmul per expert that received tokens."""
    experts = _per_expert(counts_E.tolist(), [x_AD], [gate_EID, up_EID, down_EDI])
    outs = [swiglu(x_ND, gate_ID, up_ID, down_DI) for x_ND, gate_ID, up_ID, down_DI in experts]
    return torch.cat(outs) if outs else x_AD.new_zeros(0, down_EDI.shape[1])


def looped_swiglu_combine(
    x_TD: Tensor,
    token_A: Tensor,
    weight_A: Tensor,
    counts_E: Tensor,
    gate_EID: Tensor,
    up_EID: Tensor,
    down_EDI: Tensor,
) -> Tensor:
    """sum over assignments of weight · SwiGLU_expert(x_token), one expert at a time.

    `token_A` and `weight_A` are the assignments sorted by expert (`counts_E` each). Each expert gathers its own
    rows, computes, scales and adds into the output, so no [A, D] buffer is materialised: on CPU the gather, the
    weighting and the scatter of A·D values through memory cost as much as the matmuls (benchmarks/moe_layer.py).
    For inference: the backward of each expert's `index_select` would zero-fill a [T, D] gradient, so a forward
    that needs the input's gradient gathers once instead (`RoutedExperts.forward`).
    """
    y_TD = torch.zeros_like(x_TD)
    experts = _per_expert(counts_E.tolist(), [token_A, weight_A], [gate_EID, up_EID, down_EDI])
    for token_N, weight_N, gate_ID, up_ID, down_DI in experts:
        y_ND = swiglu(x_TD.index_select(0, token_N), gate_ID, up_ID, down_DI)
        y_TD.index_add_(0, token_N, (y_ND * weight_N[:, None]).to(y_TD.dtype))
    return y_TD


def sorted_swiglu(
    x_AD: Tensor,
    counts_E: Tensor,
    gate_EID: Tensor,
    up_EID: Tensor,
    down_EDI: Tensor,
    implementation: Implementation = "auto",
) -> Tensor:
    """SwiGLU of rows already sorted by expert (`counts_E` rows each), by the chosen or the best implementation."""
    if implementation == "auto":
        implementation = choose_implementation(x_AD, x_AD.shape[0], counts_E.numel())
    if implementation == "grouped_mm":
        align = _GROUPED_MM_ALIGN_ROWS if x_AD.is_cuda else 1
        dtype = compute_dtype(x_AD)  # under autocast, activations and parameters may still be fp32
        gate, up, down = (w.to(dtype) for w in (gate_EID, up_EID, down_EDI))
        return grouped_swiglu(x_AD.to(dtype), counts_E, gate, up, down, align=align)
    if implementation == "padded":
        return padded_swiglu(x_AD, counts_E, gate_EID, up_EID, down_EDI)
    return looped_swiglu(x_AD, counts_E, gate_EID, up_EID, down_EDI)


class RoutedExperts(nn.Module):
    """Stacked SwiGLU experts: `gate_proj` [E, I, D], `up_proj` [E, I, D], `down_proj` [E, D, I]."""

    slot_of_expert: Tensor | None

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        expert_ids: Sequence[int] | None = None,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts  # logical routed experts of the layer
        self.expert_ids = list(range(num_experts)) if expert_ids is None else [int(e) for e in expert_ids]
        for e in self.expert_ids:
            if not 0 <= e < num_experts:
                raise ValueError(f"expert_ids: {e} is not a routed expert id in [0, {num_experts})")
        num_slots = len(self.expert_ids)
        self.implementation: Implementation = implementation
        self.gate_proj = nn.Parameter(torch.empty(num_slots, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_slots, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_slots, hidden_size, intermediate_size))
        if self.expert_ids == list(range(num_experts)):
            self.slot_of_expert = None
        else:  # logical id -> first slot holding it; num_slots marks "not held here"
            table = torch.full((num_experts,), num_slots, dtype=torch.long)
            for slot, e in reversed(list(enumerate(self.expert_ids))):
                table[e] = slot
            self.register_buffer("slot_of_expert", table, persistent=False)

    @property
    def num_slots(self) -> int:
        return len(self.expert_ids)

    def forward(self, x_TD: Tensor, expert_ids_TK: Tensor, expert_weights_TK: Tensor) -> Tensor:
        k = expert_ids_TK.shape[1]
        slots_A = expert_ids_TK.reshape(-1)
        if self.slot_of_expert is not None:
            slots_A = self.slot_of_expert[slots_A]
        order_A = slots_A.argsort(stable=True)
        counts_E = torch.bincount(slots_A, minlength=self.num_slots + 1)[: self.num_slots]
        if self.slot_of_expert is not None:  # drop assignments to experts held elsewhere (sorted last)
            order_A = order_A[: int(counts_E.sum().item())]
        token_A = order_A // k
        weight_A = expert_weights_TK.reshape(-1)[order_A]
        weights = (self.gate_proj, self.up_proj, self.down_proj)
        implementation = self.implementation
        if implementation == "auto":
            implementation = choose_implementation(x_TD, token_A.numel(), self.num_slots)
        if implementation == "loop" and not (torch.is_grad_enabled() and x_TD.requires_grad):
            return looped_swiglu_combine(x_TD, token_A, weight_A, counts_E, *weights)
        y_AD = sorted_swiglu(x_TD[token_A], counts_E, *weights, implementation)
        y_AD = y_AD * weight_A[:, None].to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_A, y_AD.to(x_TD.dtype))

    def extra_repr(self) -> str:
        e, i, d = self.gate_proj.shape
        return f"slots={e}, hidden={d}, intermediate={i}, experts={self.num_experts}"
