"""Expert parallelism: each rank holds its slots of the slot table, and tokens travel to their experts by all-to-all.

`ExpertParallelExperts` keeps the `mlp.experts` interface, `forward(x_TD, expert_ids_TK, expert_weights_TK) -> y_TD`,
so the model code never knows. For every (token, expert) assignment it picks one replica of the expert (round-robin
over the replicas, so a replicated hot expert's tokens are split evenly), sends the token's hidden state to that
replica's rank, runs the local experts grouped by slot, and sends the results back, where they are weighted and summed.
The activations cross ranks through an autograd-aware all-to-all, so the
same module trains. Works with gloo on CPU and nccl on GPU.

Shape legend: T = tokens on this rank, K = experts per token, A = T·K assignments, B = assignments received,
D = hidden, R = ranks, S = slots per rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from k2_workers.model import K2ForCausalLM
from k2_workers.model.experts import RoutedExperts, sorted_swiglu
from k2_workers.parallel.slot_table import SlotTable


class ExpertParallelExperts(nn.Module):
    """This rank's slots of one MoE layer: `gate_proj` [S, I, D], `up_proj` [S, I, D], `down_proj` [S, D, I]."""

    num_replicas_E: Tensor
    rank_EP: Tensor
    slot_EP: Tensor
    last_tokens_per_slot_S: Tensor  # assignments each local slot computed in the last forward

    def __init__(
        self,
        table: SlotTable,
        rank: int,
        hidden_size: int,
        intermediate_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < table.num_ranks:
            raise ValueError(f"rank {rank} is outside the slot table's {table.num_ranks} ranks")
        self.rank = rank
        self.group = group
        self.num_experts = table.num_experts
        self.expert_ids = table.table_RS[rank].tolist()  # logical expert of each local slot
        num_slots = table.slots_per_rank
        self.gate_proj = nn.Parameter(torch.empty(num_slots, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_slots, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_slots, hidden_size, intermediate_size))
        num_replicas_E, rank_EP, slot_EP = table.replicas()
        self.num_ranks = table.num_ranks
        self.register_buffer("num_replicas_E", num_replicas_E, persistent=False)
        self.register_buffer("rank_EP", rank_EP, persistent=False)
        self.register_buffer("slot_EP", slot_EP, persistent=False)
        self.register_buffer("last_tokens_per_slot_S", torch.zeros(num_slots, dtype=torch.long), persistent=False)

    @classmethod
    def from_weights(
        cls,
        table: SlotTable,
        rank: int,
        gate_proj: Tensor,
        up_proj: Tensor,
        down_proj: Tensor,
        group: dist.ProcessGroup | None = None,
    ) -> ExpertParallelExperts:
        """A shard whose slots get the given stacked weights, one row per slot of `table[rank]` in slot order."""
        _, intermediate, hidden = gate_proj.shape
        module = cls(table, rank, hidden, intermediate, group).to(gate_proj.device, gate_proj.dtype)
        if gate_proj.shape[0] != len(module.expert_ids):
            raise ValueError(f"weights for {gate_proj.shape[0]} slots, but rank {rank} has {len(module.expert_ids)}")
        with torch.no_grad():
            module.gate_proj.copy_(gate_proj)
            module.up_proj.copy_(up_proj)
            module.down_proj.copy_(down_proj)
        return module

    @classmethod
    def from_full(
        cls, full: RoutedExperts, table: SlotTable, rank: int, group: dist.ProcessGroup | None = None
    ) -> ExpertParallelExperts:
        """Shard a module holding every expert: copy the weights of this rank's slots (replicas included)."""
        if full.num_slots != full.num_experts or table.num_experts != full.num_experts:
            raise ValueError("from_full needs a module holding all experts, and a slot table over the same experts")
        ids = table.table_RS[rank].to(full.gate_proj.device)
        return cls.from_weights(table, rank, full.gate_proj[ids], full.up_proj[ids], full.down_proj[ids], group)

    def forward(self, x_TD: Tensor, expert_ids_TK: Tensor, expert_weights_TK: Tensor) -> Tensor:
        k = expert_ids_TK.shape[1]
        experts_A = expert_ids_TK.reshape(-1)
        dest_rank_A, dest_slot_A = self._choose_replicas(experts_A)
        if self.num_ranks == 1:  # every slot is here: the all-to-alls would only copy, at a collective's cost
            token_A = torch.arange(experts_A.numel(), device=x_TD.device) // k
            y_AD = self._local_experts(x_TD[token_A], dest_slot_A)
            y_AD = y_AD * expert_weights_TK.reshape(-1)[:, None].to(y_AD.dtype)
            return torch.zeros_like(x_TD).index_add(0, token_A, y_AD)

        send_order_A = dest_rank_A.argsort(stable=True)
        send_counts_R = torch.bincount(dest_rank_A, minlength=self.num_ranks)
        recv_counts_R = torch.empty_like(send_counts_R)
        dist.all_to_all_single(recv_counts_R, send_counts_R, group=self.group)
        send_splits, recv_splits = send_counts_R.tolist(), recv_counts_R.tolist()

        token_A = send_order_A // k
        slot_B = torch.empty(sum(recv_splits), dtype=torch.long, device=x_TD.device)
        dist.all_to_all_single(slot_B, dest_slot_A[send_order_A], recv_splits, send_splits, group=self.group)
        x_BD = _all_to_all(x_TD[token_A], recv_splits, send_splits, self.group)
        y_BD = self._local_experts(x_BD, slot_B)
        y_AD = _all_to_all(y_BD, send_splits, recv_splits, self.group)
        y_AD = y_AD * expert_weights_TK.reshape(-1)[send_order_A, None].to(y_AD.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_A, y_AD)

    def _choose_replicas(self, experts_A: Tensor) -> tuple[Tensor, Tensor]:
        """Rank and slot of the replica serving each assignment: an expert's assignments go round-robin over its
        replicas in token order, so every replica of a hot expert gets the same share."""
        order_A = experts_A.argsort(stable=True)
        counts_E = torch.bincount(experts_A, minlength=self.num_experts)
        starts_E = counts_E.cumsum(0) - counts_E
        position_A = torch.empty_like(experts_A)
        position_A[order_A] = torch.arange(experts_A.numel(), device=experts_A.device) - starts_E[experts_A[order_A]]
        replica_A = position_A % self.num_replicas_E[experts_A]
        return self.rank_EP[experts_A, replica_A], self.slot_EP[experts_A, replica_A]

    def _local_experts(self, x_BD: Tensor, slot_B: Tensor) -> Tensor:
        """The SwiGLU of each received row by the expert in its slot, grouped by slot."""
        order_B = slot_B.argsort(stable=True)
        counts_S = torch.bincount(slot_B, minlength=self.gate_proj.shape[0])
        self.last_tokens_per_slot_S = counts_S.detach()
        y_sorted = sorted_swiglu(x_BD[order_B], counts_S, self.gate_proj, self.up_proj, self.down_proj)
        return torch.empty_like(y_sorted).index_copy(0, order_B, y_sorted)

    def extra_repr(self) -> str:
        return f"rank={self.rank}/{self.num_ranks}, slots={self.expert_ids}, experts={self.num_experts}"


def _all_to_all(
    x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    """Differentiable all-to-all of rows (its backward is the reverse all-to-all)."""
    out = all_to_all_single_autograd(
        x, output_splits, input_splits, group or dist.distributed_c10d._get_default_group()
    )
    return out.wait() if hasattr(out, "wait") else out


def apply_expert_parallel(
    model: K2ForCausalLM,
    tables: SlotTable | Sequence[SlotTable],
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Replace every MoE layer's `mlp.experts` (holding all experts) by this rank's expert-parallel shard.

    `tables` is one slot table per MoE layer, in layer order, or a single table used for every MoE layer.
    """
    blocks = list(model.moe_blocks())
    per_layer = [tables] * len(blocks) if isinstance(tables, SlotTable) else list(tables)
    if len(per_layer) != len(blocks):
        raise ValueError(f"tables: got {len(per_layer)} slot tables for {len(blocks)} MoE layers")
    for moe, table in zip(blocks, per_layer, strict=True):
        if not isinstance(moe.experts, RoutedExperts):
            raise ValueError("apply_expert_parallel: the model's experts are already sharded")
        moe.experts = ExpertParallelExperts.from_full(moe.experts, table, rank, group)
    return model
