"""Expert parallelism inside data parallelism, for training.

With `expertParallel` = P (dividing the world size W), ranks form W/P expert-parallel groups of P consecutive ranks.
Inside a group every rank holds E/P experts of each MoE layer (k2_workers.parallel: tokens reach their experts by
all-to-all, forward and backward); every rank still trains on its own batch, so the whole world is data parallel.
Gradients: the dense parameters are averaged over all W ranks; an expert's gradient already sums the contributions
of the tokens of its whole group (the all-to-all backward brings them home), so it is summed over the W/P ranks that
hold the same experts and divided by W. The gradient norm adds the expert shards of one group to the dense norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from k2_workers.model import K2ForCausalLM
from k2_workers.train.distributed import DistEnv, all_reduce_gradients_


@dataclass(frozen=True)
class ParallelPlan:
    world_size: int
    expert_parallel: int
    ep_rank: int  # this rank's position inside its expert-parallel group
    ep_group: dist.ProcessGroup | None = None  # the P ranks that share one copy of the experts
    expert_dp_group: dist.ProcessGroup | None = None  # the W/P ranks holding the same experts

    @property
    def shard_tag(self) -> str | None:
        """The checkpoint suffix of this rank's expert shards (None without expert parallelism)."""
        return f"ep{self.ep_rank}of{self.expert_parallel}" if self.expert_parallel > 1 else None


def make_plan(env: DistEnv, expert_parallel: int) -> ParallelPlan:
    """Collective when expert_parallel > 1: every rank creates every group, in the same order."""
    if expert_parallel < 1 or env.world_size % expert_parallel != 0:
        raise ValueError(
            f"spec.parallelism.expertParallel: {expert_parallel} must divide the world size {env.world_size}"
        )
    if expert_parallel == 1:
        return ParallelPlan(env.world_size, 1, 0)
    p, w = expert_parallel, env.world_size
    ep_group = expert_dp_group = None
    for start in range(0, w, p):
        group = dist.new_group(list(range(start, start + p)))
        if start <= env.rank < start + p:
            assert isinstance(group, dist.ProcessGroup)
            ep_group = group
    for offset in range(p):
        group = dist.new_group(list(range(offset, w, p)))
        if env.rank % p == offset:
            assert isinstance(group, dist.ProcessGroup)
            expert_dp_group = group
    return ParallelPlan(w, p, env.rank % p, ep_group, expert_dp_group)


def shard_experts(model: K2ForCausalLM, plan: ParallelPlan) -> None:
    """Replace every MoE layer's experts by this rank's contiguous E/P of them (no replicas)."""
    if plan.expert_parallel == 1:
        return
    from k2_workers.parallel import SlotTable, apply_expert_parallel

    num_experts = model.config.n_routed_experts
    if num_experts % plan.expert_parallel != 0:
        raise ValueError(
            f"spec.parallelism.expertParallel: {plan.expert_parallel} must divide n_routed_experts {num_experts}"
        )
    table = SlotTable.round_robin(num_experts, plan.expert_parallel, num_experts // plan.expert_parallel)
    apply_expert_parallel(model, table, plan.ep_rank, plan.ep_group)


def expert_parameter_names(model: nn.Module, plan: ParallelPlan) -> set[str]:
    """Names of the parameters that are expert shards (empty without expert parallelism)."""
    if plan.expert_parallel == 1:
        return set()
    return {name for name, _ in model.named_parameters() if ".mlp.experts." in name}


def sync_gradients_(model: nn.Module, plan: ParallelPlan) -> None:
    experts = expert_parameter_names(model, plan)
    dense = [p for name, p in model.named_parameters() if name not in experts]
    all_reduce_gradients_(dense)
    if experts:
        sharded = [p for name, p in model.named_parameters() if name in experts]
        all_reduce_gradients_(sharded, group=plan.expert_dp_group, divisor=plan.world_size)


def clip_gradients_(model: nn.Module, plan: ParallelPlan, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping; returns the norm before clipping."""
    if plan.expert_parallel == 1:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    experts = expert_parameter_names(model, plan)
    grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    device = grads[0][1].device
    dense_sq = torch.zeros((), dtype=torch.float64, device=device)
    expert_sq = torch.zeros((), dtype=torch.float64, device=device)
    for name, grad in grads:
        sq = grad.detach().double().square().sum()
        if name in experts:
            expert_sq += sq
        else:
            dense_sq += sq
    dist.all_reduce(expert_sq, group=plan.ep_group)
    total = (dense_sq + expert_sq).sqrt().float()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([g for _, g in grads], coef.to(device))
    return total
