"""Where the replicas of each logical expert live: one layer's slot table, as an ExpertPlacement holds it.

`table_RS[r, s]` is the logical expert in slot s of rank r. One expert may have several replicas (on different
ranks); every expert must have at least one. The lookups the all-to-all dispatch needs are precomputed here.

Shape legend: R = ranks, S = slots per rank, E = logical experts, P = most replicas of any expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlotTable:
    table_RS: Tensor  # int64 logical expert ids
    num_experts: int

    def __post_init__(self) -> None:
        if self.table_RS.ndim != 2:
            raise ValueError(f"slot table: expected [ranks, slots], got shape {tuple(self.table_RS.shape)}")
        ids = self.table_RS.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"slot table: expert ids must lie in [0, {self.num_experts})")
        missing = torch.ones(self.num_experts, dtype=torch.bool)
        missing[ids] = False
        if missing.any():
            raise ValueError(f"slot table: experts {missing.nonzero().flatten().tolist()} have no replica")

    @classmethod
    def from_nested(cls, table: list[list[int]], num_experts: int) -> SlotTable:
        return cls(torch.tensor(table, dtype=torch.long), num_experts)

    @classmethod
    def round_robin(cls, num_experts: int, num_ranks: int, slots_per_rank: int) -> SlotTable:
        """Slot i of the flattened table holds expert i mod E: the placement before any load is known."""
        ids = torch.arange(num_ranks * slots_per_rank) % num_experts
        return cls(ids.reshape(num_ranks, slots_per_rank), num_experts)

    @property
    def num_ranks(self) -> int:
        return int(self.table_RS.shape[0])

    @property
    def slots_per_rank(self) -> int:
        return int(self.table_RS.shape[1])

    def replicas(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(num_replicas_E, rank_EP, slot_EP)`: each expert's replica count and the (rank, slot) of each replica,
        in rank-major order; entries past an expert's count repeat its first replica."""
        flat = self.table_RS.reshape(-1)
        order = flat.argsort(stable=True)  # grouped by expert, rank-major inside a group
        num_replicas_E = torch.bincount(flat, minlength=self.num_experts)
        starts_E = num_replicas_E.cumsum(0) - num_replicas_E
        width = int(num_replicas_E.max())
        offset_EP = torch.arange(width).expand(self.num_experts, width)
        offset_EP = torch.where(offset_EP < num_replicas_E[:, None], offset_EP, 0)
        position_EP = order[starts_E[:, None] + offset_EP]
        return num_replicas_E, position_EP // self.slots_per_rank, position_EP % self.slots_per_rank
