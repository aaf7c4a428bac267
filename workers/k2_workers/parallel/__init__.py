"""Parallelism applied to the single-device K2 model from outside.

`expert_parallel` replaces each MoE layer's `mlp.experts` with a module that holds only this rank's slots of an
ExpertPlacement-like slot table and moves tokens to the experts' ranks with all-to-all.
"""

from k2_workers.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from k2_workers.parallel.slot_table import SlotTable

__all__ = ["ExpertParallelExperts", "SlotTable", "apply_expert_parallel"]
