"""Resharding a serving rank's routed experts when a new placement is applied: which rank sends which expert
(`plan`, pure), the rank-to-rank transfers (`exchange`), where experts no rank held come from (`storage`), and the
application to the model (`resharder`)."""

from k2_workers.serve.resharding.plan import ExpertMove, plan_expert_moves
from k2_workers.serve.resharding.resharder import Resharder
from k2_workers.serve.resharding.storage import CheckpointExpertWeights, ExpertWeights, ResidentExpertWeights

__all__ = [
    "CheckpointExpertWeights",
    "ExpertMove",
    "ExpertWeights",
    "Resharder",
    "ResidentExpertWeights",
    "plan_expert_moves",
]
