"""The K2 API (group k2.ai, version v1alpha1): pydantic models of K2Training, K2Serving and ExpertPlacement.

These models are the single source of truth; the CRD YAML in crds/ is generated from them (`k2 crds generate`).
Read a manifest with `K2Training.model_validate(body)`; write one with `.to_dict()` (camelCase, unset fields left out).
"""

from k2_api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus, DType, ModelSpec, Preset
from k2_api.placement import (
    ExpertPlacement,
    ExpertPlacementSpec,
    ExpertPlacementStatus,
    LayerPlacement,
    PlacementConditionType,
    missing_experts,
    placement_problems,
    round_robin,
)
from k2_api.serving import K2Serving, K2ServingSpec, K2ServingStatus, ServingConditionType
from k2_api.training import K2Training, K2TrainingSpec, K2TrainingStatus, TrainingConditionType

KINDS = (K2Training, K2Serving, ExpertPlacement)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "DType",
    "ExpertPlacement",
    "ExpertPlacementSpec",
    "ExpertPlacementStatus",
    "K2Serving",
    "K2ServingSpec",
    "K2ServingStatus",
    "K2Training",
    "K2TrainingSpec",
    "K2TrainingStatus",
    "LayerPlacement",
    "ModelSpec",
    "PlacementConditionType",
    "Preset",
    "ServingConditionType",
    "TrainingConditionType",
    "missing_experts",
    "placement_problems",
    "round_robin",
]
