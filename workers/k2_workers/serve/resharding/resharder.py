"""Applying a placement to one rank's model: every MoE layer gets the shard its new slot table gives this rank.

Per layer, an expert the rank already holds is reused (moving it between its own slots is free), an expert another
rank held under the previous table arrives from that rank (`plan`, `exchange`: every rank of the group takes part,
even when its own slots do not change), and only an expert no rank held is read from storage (`storage`). Every
rank of the group applies the same placement at the same point of the broadcast stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from k2_api.contract import WeightSources
from k2_workers.model import K2ForCausalLM
from k2_workers.parallel import ExpertParallelExperts, SlotTable
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.resharding.exchange import ExpertTriple, exchange_experts
from k2_workers.serve.resharding.plan import plan_expert_moves
from k2_workers.serve.resharding.storage import ExpertWeights

CountBytes = Callable[[str, int], None]  # (source, bytes) of expert weights taken in


class Resharder:
    """Reshards `model`'s routed experts for `rank` of a `world_size` group, reading missing experts from
    `weights` and telling `count_bytes` how many weight bytes came from each source."""

    def __init__(
        self,
        model: K2ForCausalLM,
        weights: ExpertWeights,
        rank: int,
        world_size: int,
        count_bytes: CountBytes | None = None,
    ) -> None:
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self._weights = weights
        self._count_bytes = count_bytes

    def apply(self, current: ActivePlacement | None, new: ActivePlacement) -> None:
        """Turn the model's shards from `current` (None: the model holds what it was built with) into `new`."""
        blocks = list(self.model.moe_blocks())
        if len(new.tables) != len(blocks):
            raise ValueError(f"placement has {len(new.tables)} layers, the model {len(blocks)} MoE layers")
        if new.num_ranks != self.world_size:
            raise ValueError(f"placement has {new.num_ranks} ranks, this group {self.world_size}")
        for index, (moe, table) in enumerate(zip(blocks, new.tables, strict=True)):
            old = None if current is None else current.tables[index]
            moe.experts = self._layer(index, moe.experts, old, table)

    def _layer(self, index: int, experts: nn.Module, old: SlotTable | None, new: SlotTable) -> ExpertParallelExperts:
        """This rank's shard of MoE layer `index` under `new`."""
        wanted = new.table_RS[self.rank].tolist()
        config = self.model.config
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        dtype, device = self.model.lm_head.weight.dtype, self.model.lm_head.weight.device
        sources: dict[int, ExpertTriple] = {}
        if isinstance(experts, ExpertParallelExperts) and old is not None:
            gate, up, down = (experts.gate_proj.detach(), experts.up_proj.detach(), experts.down_proj.detach())
            for slot, expert in enumerate(experts.expert_ids):
                sources.setdefault(expert, (gate[slot], up[slot], down[slot]))
            moves = plan_expert_moves(old, new)
            received = exchange_experts(moves, self.rank, sources.__getitem__, inter, hidden, gate)
            self._count(WeightSources.PEER, received.values())
            sources.update(received)
        missing = [e for e in dict.fromkeys(wanted) if e not in sources]
        if missing:
            stacked = [w.to(device=device, dtype=dtype) for w in self._weights.experts(index, missing)]
            loaded = {e: (stacked[0][i], stacked[1][i], stacked[2][i]) for i, e in enumerate(missing)}
            self._count(WeightSources.STORAGE, loaded.values())
            sources.update(loaded)
        gate, up, down = (torch.stack([sources[e][p] for e in wanted]) for p in range(3))
        return ExpertParallelExperts.from_weights(new, self.rank, gate, up, down)

    def _count(self, source: str, experts: Iterable[ExpertTriple]) -> None:
        nbytes = sum(w.numel() * w.element_size() for triple in experts for w in triple)
        if self._count_bytes is not None and nbytes:
            self._count_bytes(source, nbytes)
