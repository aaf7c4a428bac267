"""Pieces shared by the three kinds: base model, conditions, scheduling, resources, model spec.

Field names are snake_case in Python and camelCase on the wire (aliases), as Kubernetes uses. Every field has a
description: the CRD generator copies them into the OpenAPI schema, where `kubectl explain` shows them.
CEL rules (`x-kubernetes-validations`) sit beside the models they constrain; the same rules are checked in Python by
`model_validator`s so that code reading a manifest fails with the same message the API server gives.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator
from pydantic.alias_generators import to_camel

from k2_api import uris

GROUP = "k2.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Object names feed child names (`<name>-worker-<i>`, `<name>-g<i>-<ordinal>`), which must stay DNS labels (63 chars).
MAX_NAME_LENGTH = 40


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict[str, JsonValue]:
    """One `x-kubernetes-validations` entry. `field_path` (relative, `.a.b`) makes the API server report the field."""
    entry: dict[str, JsonValue] = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


class ApiModel(BaseModel):
    """Base of every spec/status object: camelCase aliases, unknown fields rejected, names or aliases accepted."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def subobject(model: type[BaseModel], description: str) -> Any:
    """A nested object that defaults to `{}` so that the API server fills in its own field defaults."""
    return Field(default_factory=model, description=description, json_schema_extra={"default": {}})


def storage_uri_field(field: str, description: str, min_length: int | None = None) -> Any:
    """An optional storage-URI string (k2_api.uris) whose CEL rules name `field`; the model checks it with
    `uris.parse` too."""
    return Field(
        default=None,
        min_length=min_length,
        max_length=2048,
        description=description,
        json_schema_extra={"x-kubernetes-validations": uris.cel_rules(field)},  # type: ignore[dict-item]
    )


def name_rule() -> dict[str, JsonValue]:
    """Root-level rule of every kind: names short enough for the children's names."""
    return cel(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
        f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child object names are derived from it)",
    )


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A metav1-style condition: one observation about one aspect of the resource."""

    type: str = Field(min_length=1, max_length=316, description="Condition type, e.g. Available or Running.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="One CamelCase word saying why the condition has this status."
    )
    message: str | None = Field(default=None, max_length=32768, description="Human-readable details.")
    last_transition_time: datetime | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation of the spec this condition was computed from."
    )


CONDITIONS_LIST_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def conditions_field(kinds: str) -> Any:
    return Field(
        default_factory=list,
        max_length=16,
        description=f"Latest observations of the resource's state, one per type ({kinds}).",
        json_schema_extra=CONDITIONS_LIST_EXTRA,
    )


def find_condition(conditions: list[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.type == condition_type), None)


class TolerationOperator(enum.StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(enum.StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A core/v1 Toleration, copied into every worker pod."""

    key: str | None = Field(default=None, description="Taint key; empty with operator Exists matches every taint.")
    operator: TolerationOperator | None = Field(default=None, description="Exists or Equal (Kubernetes default).")
    value: str | None = Field(default=None, description="Taint value matched with operator Equal.")
    effect: TaintEffect | None = Field(default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class Scheduling(ApiModel):
    """Where worker pods may run. Gang schedulers (Volcano, scheduler-plugins, KAI) are chosen with schedulerName."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels a node must carry, e.g. {nvidia.com/gpu.product: H100}."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations added to every worker pod."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 Affinity object copied verbatim into every worker pod (not validated here).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the worker pods (preemption order)."
    )
    scheduler_name: str | None = Field(
        default=None,
        max_length=253,
        description="Scheduler for the worker pods, e.g. volcano for gang scheduling; default-scheduler when empty.",
    )


class PullPolicy(enum.StrEnum):
    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class RankResources(ApiModel):
    """CPU and memory of one worker pod (GPUs are counted by the kind's own field)."""

    cpu: int | str | None = Field(default=None, description="CPU request and limit, a Kubernetes quantity (e.g. 8).")
    memory: int | str | None = Field(
        default=None, description="Memory request and limit, a Kubernetes quantity (e.g. 64Gi)."
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        min_length=1,
        max_length=253,
        description="Extended resource that counts GPUs on the nodes.",
    )


class Preset(enum.StrEnum):
    """Model configurations built into the workers (k2_workers.model.K2Config.from_preset)."""

    KIMI_K2 = "kimi-k2"
    DEEPSEEK_V3 = "deepseek-v3"
    K2_DEBUG = "k2-debug"
    MIXTRAL_8X7B = "mixtral-8x7b"
    MIXTRAL_DEBUG = "mixtral-debug"


class DType(enum.StrEnum):
    BF16 = "bf16"
    FP8 = "fp8"
    FP32 = "fp32"


class InlineModelConfig(BaseModel):
    """A Hugging Face DeepSeek-V3-style config.json. The MoE fields are typed; any other HF field is kept as given."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-validations": [
                cel(
                    "self.num_experts_per_tok <= self.n_routed_experts",
                    "spec.model.config.num_experts_per_tok must be <= spec.model.config.n_routed_experts",
                    field_path=".num_experts_per_tok",
                ),
                cel(
                    "!has(self.first_k_dense_replace) || self.first_k_dense_replace < self.num_hidden_layers",
                    "spec.model.config.first_k_dense_replace must be < spec.model.config.num_hidden_layers"
                    " (at least one MoE layer)",
                    field_path=".first_k_dense_replace",
                ),
            ],
        },
    )
    # Field names are the HF config keys, so no camelCase alias here.
    num_hidden_layers: int = Field(ge=1, le=1024, description="Transformer layers (dense and MoE).")
    n_routed_experts: int = Field(ge=1, le=4096, description="Routed experts per MoE layer.")
    num_experts_per_tok: int = Field(ge=1, le=64, description="Experts each token is routed to (top-k).")
    first_k_dense_replace: int | None = Field(
        default=None, ge=0, le=1024, description="Leading dense layers; the remaining layers are MoE (default 1)."
    )
    hidden_size: int | None = Field(default=None, ge=1, le=65536, description="Model width.")
    moe_intermediate_size: int | None = Field(default=None, ge=1, le=65536, description="Width of one expert.")
    n_shared_experts: int | None = Field(default=None, ge=0, le=64, description="Shared experts per MoE layer.")
    vocab_size: int | None = Field(default=None, ge=1, le=4194304, description="Vocabulary size.")

    @model_validator(mode="after")
    def _check(self) -> InlineModelConfig:
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                "spec.model.config.num_experts_per_tok must be <= spec.model.config.n_routed_experts"
                f" (got {self.num_experts_per_tok} > {self.n_routed_experts})"
            )
        if self.first_k_dense_replace is not None and self.first_k_dense_replace >= self.num_hidden_layers:
            raise ValueError(
                "spec.model.config.first_k_dense_replace must be < spec.model.config.num_hidden_layers"
                " (at least one MoE layer)"
            )
        return self

    def hf_dict(self) -> dict[str, Any]:
        """The config as a Hugging Face config.json dict (typed and extra keys, unset keys left out)."""
        return self.model_dump(mode="json", exclude_none=True)


CHECKPOINT_URI_FIELD = "spec.model.checkpointUri"


class ModelSpec(ApiModel):
    """Which model to run: a built-in preset or an inline HF config, plus optional weights."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.preset) != has(self.config)",
                    "spec.model: exactly one of spec.model.preset or spec.model.config must be set",
                ),
            ]
        }
    )
    preset: Preset | None = Field(
        default=None,
        description="Built-in configuration: kimi-k2, deepseek-v3, mixtral-8x7b, k2-debug or mixtral-debug.",
    )
    config: InlineModelConfig | None = Field(default=None, description="Inline Hugging Face style config.json.")
    checkpoint_uri: str | None = storage_uri_field(
        CHECKPOINT_URI_FIELD,
        "Weights to load (HF safetensors directory): file:///path (or /path) inside the pod, or "
        "pvc://<claim>/<path> in a PersistentVolumeClaim of the namespace, which the operator mounts read-only on "
        "every worker pod. Empty: random initialisation (training) or random weights (serving tests).",
    )
    dtype: DType = Field(default=DType.BF16, description="Parameter dtype: bf16, fp8 (e4m3, 128x128 blocks) or fp32.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        if (self.preset is None) == (self.config is None):
            raise ValueError("spec.model: exactly one of spec.model.preset or spec.model.config must be set")
        if self.checkpoint_uri is not None:
            uris.parse(self.checkpoint_uri, CHECKPOINT_URI_FIELD)
        return self


class ObjectMeta(BaseModel):
    """The parts of metav1.ObjectMeta our code reads; everything else is kept as given."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(BaseModel):
    """Base of the three top-level kinds: the full manifest (apiVersion, kind, metadata, spec, status)."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="ignore")

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SINGULAR: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    GROUP: ClassVar[str] = GROUP
    VERSION: ClassVar[str] = VERSION

    api_version: Literal["k2.ai/v1alpha1"] = "k2.ai/v1alpha1"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @model_validator(mode="after")
    def _name_length(self) -> Resource:
        if self.metadata.name is not None and len(self.metadata.name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters (child object names are derived from it)"
            )
        return self

    @classmethod
    def crd_name(cls) -> str:
        return f"{cls.PLURAL}.{GROUP}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest as Kubernetes expects it: camelCase keys, unset optional fields and empty maps left out."""
        body = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["metadata"] = {k: v for k, v in body["metadata"].items() if v != {}}
        order = ("apiVersion", "kind", "metadata", "spec", "status")
        return {key: body[key] for key in order if key in body}
