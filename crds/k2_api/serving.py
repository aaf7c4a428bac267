"""K2Serving: serve a K2 model as N independent expert-parallel groups behind one frontend, balanced by EPLB."""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from k2_api.common import (
    ApiModel,
    Condition,
    ModelSpec,
    PullPolicy,
    RankResources,
    Resource,
    Scheduling,
    cel,
    conditions_field,
    subobject,
)
from k2_api.contract import Ports

KIND = "K2Serving"
PLURAL = "k2servings"
SINGULAR = "k2serving"
SHORT_NAMES = ("k2s",)


class ServingConditionType(enum.StrEnum):
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    REBALANCING = "Rebalancing"


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class Frontend(ApiModel):
    """The request router in front of the groups (a Deployment and a Service)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.grpcPort) || !has(self.port) || self.grpcPort != self.port",
                    "spec.frontend.grpcPort must differ from spec.frontend.port",
                    field_path=".grpcPort",
                )
            ]
        }
    )

    replicas: int = Field(default=1, ge=0, le=64, description="Frontend pods.")
    port: int = Field(default=Ports.FRONTEND, ge=1, le=65535, description="Port of the frontend Service (HTTP).")
    grpc_port: int = Field(
        default=Ports.GRPC,
        ge=1,
        le=65535,
        description="Port of the frontend Service's gRPC (generation, grpc.health.v1, reflection).",
    )
    service_type: ServiceType = Field(default=ServiceType.CLUSTER_IP, description="Type of the frontend Service.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> Frontend:
        if self.grpc_port == self.port:
            raise ValueError("spec.frontend.grpcPort must differ from spec.frontend.port")
        return self


class Eplb(ApiModel):
    """Expert-parallel load balancing: how the EPLB controller rewrites the ExpertPlacement from measured load."""

    enabled: bool = Field(default=True, description="Rebalance experts from measured load.")
    interval_seconds: int = Field(default=60, ge=1, le=86400, description="How often the controller plans.")
    window_seconds: int = Field(
        default=300, ge=1, le=604800, description="Load is the expert token rate over this trailing window."
    )
    min_improvement: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Apply a new placement only if it raises predicted balancedness (mean/max GPU load) by this much.",
    )
    max_moves_fraction: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description=(
            "Move budget per rebalance as a fraction of a group's expert slots over all its MoE layers "
            "(MoE layers x ranksPerGroup x slotsPerRank), rounded up."
        ),
    )
    max_moves: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Absolute move budget (expert copies) per rebalance; the smaller of the two budgets applies.",
    )
    cooldown_seconds: int = Field(
        default=120, ge=0, le=86400, description="Minimum time between two applied rebalances."
    )
    prometheus_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Prometheus to read k2_expert_tokens_total from; default: the controller's --prometheus-url.",
    )

    def move_budget(self, num_slots: int) -> int:
        """Expert copies one rebalance may move in a group of `num_slots` slots over all its MoE layers."""
        budget = math.ceil(self.max_moves_fraction * num_slots)
        return budget if self.max_moves is None else min(budget, self.max_moves)


class Rollout(ApiModel):
    """How image or model changes roll out: group by group, so the other groups keep serving."""

    max_unavailable_groups: int = Field(
        default=1, ge=1, le=256, description="Groups updated (and so unavailable) at the same time."
    )


class NetworkPolicy(ApiModel):
    """Ingress NetworkPolicies the operator creates for the serving's pods (enforced only by a CNI that implements
    them): each group's rendezvous and rank HTTP ports admit only that group's ranks and the serving's frontend, the
    ranks' metrics port only the operator's monitoring namespaces (`--monitoring-namespace`), the frontend port the
    serving's namespace (anyone, for a NodePort or LoadBalancer frontend)."""

    enabled: bool = Field(default=True, description="Create the NetworkPolicies; false deletes them.")


class K2ServingSpec(ApiModel):
    """Desired state of a K2Serving."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!has(self.model.config) || (self.model.config.n_routed_experts + self.ranksPerGroup - 1) / "
                    "self.ranksPerGroup + self.redundantSlotsPerRank <= self.model.config.n_routed_experts",
                    "spec.redundantSlotsPerRank is too large: slots per rank (ceil(n_routed_experts / "
                    "spec.ranksPerGroup) + spec.redundantSlotsPerRank) must be <= spec.model.config.n_routed_experts",
                    field_path=".redundantSlotsPerRank",
                ),
            ]
        }
    )

    model: ModelSpec = Field(description="The model to serve: preset or inline config, weights, dtype.")
    image: str = Field(min_length=1, max_length=1024, description="Worker container image (runs `k2 worker serve`).")
    image_pull_policy: PullPolicy = Field(default=PullPolicy.IF_NOT_PRESENT, description="Image pull policy.")
    groups: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Independent expert-parallel groups, each a full copy of the model (the scale subresource).",
    )
    ranks_per_group: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="Expert-parallel ranks (pods) per group; experts are spread over them.",
    )
    gpus_per_rank: int = Field(default=1, ge=0, le=64, description="GPUs requested by each rank pod.")
    redundant_slots_per_rank: int = Field(
        default=1,
        ge=0,
        le=256,
        description="Extra expert slots per rank for replicas of hot experts; a rank has ceil(numExperts / "
        "ranksPerGroup) + redundantSlotsPerRank slots.",
    )
    resources: RankResources = subobject(RankResources, "CPU and memory of each rank pod.")
    scheduling: Scheduling = subobject(Scheduling, "Node selection and scheduler of the rank pods.")
    frontend: Frontend = subobject(Frontend, "The request router in front of the groups.")
    eplb: Eplb = subobject(Eplb, "Expert-parallel load balancing.")
    rollout: Rollout = subobject(Rollout, "Rolling update of groups.")
    network_policy: NetworkPolicy = subobject(NetworkPolicy, "Ingress NetworkPolicies of the rank and frontend pods.")
    suspend: bool = Field(default=False, description="True scales every group and the frontend to zero.")

    @model_validator(mode="after")
    def _cross_field(self) -> K2ServingSpec:
        config = self.model.config
        if config is not None and self.slots_per_rank(config.n_routed_experts) > config.n_routed_experts:
            raise ValueError(
                "spec.redundantSlotsPerRank is too large: slots per rank (ceil(n_routed_experts / spec.ranksPerGroup)"
                " + spec.redundantSlotsPerRank) must be <= spec.model.config.n_routed_experts"
            )
        return self

    def slots_per_rank(self, num_experts: int) -> int:
        """Expert slots on each rank for a model with num_experts routed experts."""
        return -(-num_experts // self.ranks_per_group) + self.redundant_slots_per_rank


class GroupStatus(ApiModel):
    """One expert-parallel group as the operator last saw it, gang restarts included."""

    group: int = Field(ge=0, description="Group index (the k2.ai/group label).")
    ready: bool = Field(default=False, description="Every rank is ready and the group is not restarting.")
    ready_ranks: int = Field(default=0, ge=0, description="Ready rank pods of the group.")
    restarting: bool = Field(
        default=False,
        description="A rank failed: the group's rank pods are being restarted together (or wait out the backoff).",
    )
    restarts: int = Field(default=0, ge=0, description="Gang restarts of the group after a rank failed.")
    last_restart_time: datetime | None = Field(default=None, description="When the last gang restart began.")
    last_restart_reason: str | None = Field(
        default=None, max_length=1024, description="Why: the rank pod that failed and how (exit code, deletion)."
    )
    next_restart_time: datetime | None = Field(
        default=None, description="While the restart backoff holds a gang restart back: when it runs."
    )


class K2ServingStatus(ApiModel):
    """Observed state of a K2Serving."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the operator last reconciled."
    )
    conditions: list[Condition] = conditions_field("Available, Progressing, Degraded, Rebalancing")
    groups: int = Field(default=0, ge=0, description="Groups that exist (spec.groups once reconciled).")
    ready_groups: int = Field(default=0, ge=0, description="Groups whose every rank is ready.")
    updated_groups: int = Field(default=0, ge=0, description="Groups running the current image and model.")
    ready_ranks: int = Field(default=0, ge=0, description="Ready rank pods over all groups.")
    selector: str | None = Field(
        default=None, description="Label selector of the rank pods (for the scale subresource)."
    )
    endpoint: str | None = Field(default=None, description="URL of the frontend Service inside the cluster.")
    placement_name: str | None = Field(default=None, description="Name of the owned ExpertPlacement.")
    placement_generation: int | None = Field(
        default=None, ge=0, description="spec.generation of the ExpertPlacement that every ready group applied."
    )
    balancedness: float | None = Field(
        default=None, ge=0, le=1, description="Measured mean/max GPU load of the placement in force (1 is perfect)."
    )
    group_statuses: list[GroupStatus] = Field(
        default_factory=list,
        max_length=256,
        description="Per group: readiness and gang restarts (a rank's failure restarts its whole group).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["group"]},
    )


class K2Serving(Resource):
    """A K2Serving manifest: `K2Serving.model_validate(body)` accepts what the API server returns."""

    KIND: ClassVar[str] = KIND
    PLURAL: ClassVar[str] = PLURAL
    SINGULAR: ClassVar[str] = SINGULAR
    SHORT_NAMES: ClassVar[tuple[str, ...]] = SHORT_NAMES

    kind: Literal["K2Serving"] = "K2Serving"
    spec: K2ServingSpec
    status: K2ServingStatus | None = None
