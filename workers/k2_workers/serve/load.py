"""Load accounting of one serving rank: the tokens each logical expert and each local slot received.

Forward hooks on the model's MoE blocks add each forward's counts to numpy arrays; after each step `flush` hands them
to the `ExpertLoadCollector` that /metrics exports. Rank 0 counts the tokens routed to each logical expert (the
other ranks route the same tokens and do not count them again); every rank counts the (token, expert) pairs each of
its slots computed, the work the EPLB controller balances. The expert-weight bytes a placement change took in are
counted here too.

Shapes: L MoE layers, E logical experts, S slots on this rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from k2_workers.model import K2ForCausalLM
from k2_workers.model.moe import MoE
from k2_workers.parallel import ExpertParallelExperts
from k2_workers.serve.metrics import ExpertLoadCollector


class LoadCounter:
    """Counts `model`'s routed tokens from its forward passes; `collector` None counts nothing out."""

    def __init__(self, model: K2ForCausalLM, rank: int, collector: ExpertLoadCollector | None = None) -> None:
        self.rank = rank
        self._collector = collector
        blocks = list(model.moe_blocks())
        self._expert_tokens_LE: npt.NDArray[np.float64] = np.zeros((len(blocks), model.config.n_routed_experts))
        self._slot_tokens_LS: npt.NDArray[np.float64] | None = None  # shaped by the first placement
        for index, moe in enumerate(blocks):
            moe.register_forward_hook(self._hook(index))

    def reset_slots(self, slots_per_rank: int) -> None:
        """Start counting per slot afresh: a new placement changes what a slot holds."""
        self._slot_tokens_LS = np.zeros((len(self._expert_tokens_LE), slots_per_rank))

    def flush(self) -> None:
        """Hand the counts since the last flush to the collector."""
        if self._collector is not None and self._slot_tokens_LS is not None:
            self._collector.add(self._expert_tokens_LE, self._slot_tokens_LS)
        self._expert_tokens_LE[:] = 0
        if self._slot_tokens_LS is not None:
            self._slot_tokens_LS[:] = 0

    def add_weight_bytes(self, source: str, nbytes: int) -> None:
        """Expert-weight bytes taken in from `source` (a `WeightSources` value) to apply a placement."""
        if self._collector is not None:
            self._collector.add_weight_bytes(source, nbytes)

    def _hook(self, index: int) -> Callable[[MoE, object, object], None]:
        def hook(module: MoE, args: object, output: object) -> None:
            if self.rank == 0:  # rank 0 routes the group's tokens; the others route the same tokens again
                self._expert_tokens_LE[index] += module.last_tokens_per_expert_E.cpu().numpy()
            experts = module.experts
            if self._slot_tokens_LS is not None and isinstance(experts, ExpertParallelExperts):
                self._slot_tokens_LS[index] += experts.last_tokens_per_slot_S.cpu().numpy()

        return hook
