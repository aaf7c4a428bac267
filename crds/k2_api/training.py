"""K2Training: pre-train or fine-tune a K2 model on a gang of worker pods with MuonClip."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import ClassVar, Final, Literal

from pydantic import ConfigDict, Field, model_validator

from k2_api import uris
from k2_api.common import (
    ApiModel,
    Condition,
    DType,
    ModelSpec,
    PullPolicy,
    RankResources,
    Resource,
    Scheduling,
    cel,
    conditions_field,
    storage_uri_field,
    subobject,
)

KIND = "K2Training"
PLURAL = "k2trainings"
SINGULAR = "k2training"
SHORT_NAMES = ("k2t",)

# CEL expression of the processes per pod, mirrored by K2TrainingSpec.procs_per_node.
_PROCS_CEL = "(has(self.procsPerNode) ? self.procsPerNode : (self.gpusPerNode > 0 ? self.gpusPerNode : 1))"


class TrainingConditionType(enum.StrEnum):
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    CHECKPOINT_FALLBACK = "CheckpointFallback"
    """True while the running gang resumed from an older checkpoint because newer ones could not be read (set once
    rank 0 reports it in status.progress.checkpointFallback; absent until a fallback ever happened)."""


class Parallelism(ApiModel):
    """How the world (numNodes x procsPerNode ranks) is split. Experts are sharded over expertParallel ranks."""

    expert_parallel: int = Field(
        default=1, ge=1, le=1024, description="Ranks that share one copy of the experts (expert-parallel degree)."
    )
    data_parallel: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Data-parallel degree; default world size / expertParallel. When set, "
        "dataParallel x expertParallel must equal the world size.",
    )


class Optimizer(ApiModel):
    """MuonClip (Muon for matrices, AdamW for the rest, QK-Clip on attention) with a warmup-stable-decay schedule."""

    lr: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate of the Muon (matrix) parameters.")
    adam_lr: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Learning rate of the AdamW parameters (embeddings, norms, router bias-free parts); default lr.",
    )
    weight_decay: float = Field(default=0.1, ge=0, le=1, description="Decoupled weight decay.")
    momentum: float = Field(default=0.95, ge=0, lt=1, description="Muon (Nesterov) momentum.")
    qk_clip_tau: float = Field(
        default=100.0,
        gt=0,
        le=1e6,
        description="QK-Clip threshold: heads whose max pre-softmax logit exceeds tau get their q/k weights rescaled.",
    )
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000_000, description="Linear warmup steps (WSD schedule).")
    decay_steps: int = Field(
        default=0, ge=0, le=1_000_000_000, description="Final steps of cosine decay to finalLrRatio x lr (WSD)."
    )
    final_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="Learning rate at the end of decay, over lr.")
    grad_clip: float = Field(
        default=1.0, ge=0, le=1e6, description="Bound on the global gradient norm before each step; 0 turns it off."
    )
    router_bias_update_rate: float = Field(
        default=1e-3,
        ge=0,
        le=1,
        description="u of the loss-free balancing rule b += u * sign(mean load - load); 0 freezes the biases.",
    )
    aux_loss_alpha: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Weight of the Switch auxiliary balance loss (alpha * N * sum f_i P_i); 0 is off.",
    )


DATA_URI_FIELD = "spec.data.uri"
CHECKPOINT_DIR_FIELD = "spec.checkpointing.uri"


class Data(ApiModel):
    """The training text: a corpus bundled in the worker image or a URI, cut into sequences of seqLen tokens."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.corpus) != has(self.uri)",
                    "spec.data: exactly one of spec.data.corpus or spec.data.uri must be set",
                )
            ]
        }
    )
    corpus: str | None = Field(
        default=None, min_length=1, max_length=253, description="Name of a corpus bundled in the worker image."
    )
    uri: str | None = storage_uri_field(
        DATA_URI_FIELD,
        "Text or token files to read (a .txt file, or a directory of token shards with index.json): file:///path "
        "(or /path) inside the pod, or pvc://<claim>/<path> in a PersistentVolumeClaim of the namespace, which the "
        "operator mounts read-only on every worker pod.",
        min_length=1,
    )
    seq_len: int = Field(default=4096, ge=8, le=1_048_576, description="Tokens per training sequence.")
    batch_size: int = Field(default=1, ge=1, le=65536, description="Sequences per rank per step (micro-batch).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of data order and initialisation.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Data:
        if (self.corpus is None) == (self.uri is None):
            raise ValueError("spec.data: exactly one of spec.data.corpus or spec.data.uri must be set")
        if self.uri is not None:
            uris.parse(self.uri, DATA_URI_FIELD)
        return self


BROKEN_GANG_GRACE_S: Final = 5
"""The termination grace of a broken gang's pods, which the operator deletes to restart it: not enough to checkpoint
(which needs every rank), only to exit."""


class Checkpointing(ApiModel):
    """Where and how often checkpoints are written; a restarted or resumed gang continues from the latest one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "!(has(self.uri) && has(self.claimName))",
                    "spec.checkpointing: set at most one of spec.checkpointing.uri or spec.checkpointing.claimName",
                )
            ]
        }
    )
    uri: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Checkpoint directory the workers can reach, e.g. file:///shared/ckpt (a local path: for a "
        "claim use claimName).",
        json_schema_extra={"x-kubernetes-validations": uris.local_cel_rules(CHECKPOINT_DIR_FIELD)},  # type: ignore[dict-item]
    )
    claim_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="PersistentVolumeClaim mounted at mountPath on every worker. Neither uri nor claimName: an "
        "emptyDir (checkpoints survive container restarts only).",
    )
    mount_path: str = Field(
        default="/checkpoints", min_length=1, max_length=1024, description="Where the claim or emptyDir is mounted."
    )
    every_n_steps: int = Field(default=100, ge=1, le=1_000_000_000, description="Save every N optimizer steps.")
    keep_last: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    preemption_grace_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="How long a preempted worker pod (deleted, drained, or stopped by spec.suspend) has to finish "
        "its step and write its checkpoint before it is killed: the pods' terminationGracePeriodSeconds. The pods "
        f"of a gang that broke (a rank crashed) get {BROKEN_GANG_GRACE_S} s instead: a gang missing a rank cannot "
        "checkpoint.",
    )

    @model_validator(mode="after")
    def _at_most_one(self) -> Checkpointing:
        if self.uri is not None and self.claim_name is not None:
            raise ValueError(
                "spec.checkpointing: set at most one of spec.checkpointing.uri or spec.checkpointing.claimName"
            )
        if self.uri is not None:
            uris.local_only(self.uri, CHECKPOINT_DIR_FIELD)
        return self


class FailurePolicy(ApiModel):
    """What happens when a worker fails: the whole gang restarts from the last checkpoint, up to maxRestarts."""

    max_restarts: int = Field(
        default=3, ge=0, le=1000, description="Gang restarts allowed before the training is marked Failed."
    )


class K2TrainingSpec(ApiModel):
    """Desired state of a K2Training."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!has(self.parallelism.dataParallel) || self.parallelism.dataParallel * "
                    f"self.parallelism.expertParallel == self.numNodes * {_PROCS_CEL}",
                    "spec.parallelism.dataParallel x spec.parallelism.expertParallel must equal the world size "
                    "(spec.numNodes x spec.procsPerNode)",
                    field_path=".parallelism.dataParallel",
                ),
                cel(
                    f"(self.numNodes * {_PROCS_CEL}) % self.parallelism.expertParallel == 0",
                    "spec.parallelism.expertParallel must divide the world size (spec.numNodes x spec.procsPerNode)",
                    field_path=".parallelism.expertParallel",
                ),
                cel(
                    "self.optimizer.warmupSteps + self.optimizer.decaySteps <= self.steps",
                    "spec.optimizer.warmupSteps + spec.optimizer.decaySteps must be <= spec.steps",
                    field_path=".optimizer",
                ),
            ]
        }
    )

    model: ModelSpec = Field(description="The model to train: preset or inline config, initial weights, dtype.")
    image: str = Field(min_length=1, max_length=1024, description="Worker container image (runs `k2 worker train`).")
    image_pull_policy: PullPolicy = Field(default=PullPolicy.IF_NOT_PRESENT, description="Image pull policy.")
    num_nodes: int = Field(default=1, ge=1, le=4096, description="Worker pods in the gang (torchrun nnodes).")
    gpus_per_node: int = Field(default=8, ge=0, le=64, description="GPUs requested by each worker pod.")
    procs_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Ranks per pod (torchrun nproc-per-node); default gpusPerNode, or 1 when gpusPerNode is 0.",
    )
    resources: RankResources = subobject(RankResources, "CPU and memory of each worker pod.")
    scheduling: Scheduling = subobject(Scheduling, "Node selection and scheduler of the worker pods.")
    parallelism: Parallelism = subobject(Parallelism, "Expert- and data-parallel degrees.")
    optimizer: Optimizer = subobject(Optimizer, "MuonClip hyper-parameters and learning-rate schedule.")
    data: Data = Field(
        default_factory=lambda: Data(corpus="synthetic"),
        description="Training data (default: the bundled synthetic corpus).",
        json_schema_extra={"default": {"corpus": "synthetic"}},
    )
    steps: int = Field(default=1000, ge=1, le=1_000_000_000, description="Optimizer steps to run.")
    checkpointing: Checkpointing = subobject(Checkpointing, "Checkpoint location, interval and retention.")
    failure_policy: FailurePolicy = subobject(FailurePolicy, "Gang restart budget.")
    suspend: bool = Field(
        default=False, description="True deletes the worker pods and keeps status; false resumes from the checkpoint."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="Delete the K2Training this long after it Succeeded or Failed; never when unset.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Fail the training when it has been running (not suspended) longer than this.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> K2TrainingSpec:
        world = self.world_size
        if self.parallelism.data_parallel is not None and (
            self.parallelism.data_parallel * self.parallelism.expert_parallel != world
        ):
            raise ValueError(
                "spec.parallelism.dataParallel x spec.parallelism.expertParallel must equal the world size "
                f"(spec.numNodes x spec.procsPerNode = {world})"
            )
        if world % self.parallelism.expert_parallel != 0:
            raise ValueError(
                f"spec.parallelism.expertParallel must divide the world size (spec.numNodes x spec.procsPerNode = "
                f"{world})"
            )
        if self.optimizer.warmup_steps + self.optimizer.decay_steps > self.steps:
            raise ValueError("spec.optimizer.warmupSteps + spec.optimizer.decaySteps must be <= spec.steps")
        return self

    @property
    def nproc_per_node(self) -> int:
        """Ranks per pod: procsPerNode, else gpusPerNode, else 1."""
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.nproc_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.parallelism.expert_parallel


class SkippedCheckpoint(ApiModel):
    """A checkpoint that looked complete but could not be read (moved aside to `<path>.corrupt-<unix time>`)."""

    step: int = Field(ge=0, description="Step of the skipped checkpoint.")
    path: str = Field(max_length=4096, description="Where it was.")
    reason: str = Field(max_length=4096, description="Why it could not be read (per rank when ranks disagreed).")


class CheckpointFallback(ApiModel):
    """The gang's last resume skipped unreadable checkpoints and fell back to an older one (or to step 0)."""

    resumed_from: str | None = Field(default=None, description="The checkpoint resumed from; null: from step 0.")
    resumed_step: int | None = Field(default=None, ge=0, description="Its step; null: started from step 0.")
    skipped: list[SkippedCheckpoint] = Field(
        default_factory=list, max_length=100, description="The newer checkpoints skipped, newest first."
    )


class Progress(ApiModel):
    """Training progress that rank 0 of the gang writes through the status subresource."""

    step: int = Field(default=0, ge=0, description="Last completed optimizer step.")
    loss: float | None = Field(default=None, description="Training loss at that step.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Throughput of the whole gang.")
    max_attention_logit: float | None = Field(
        default=None, description="Largest pre-softmax attention logit of the step (what QK-Clip bounds)."
    )
    dropped_token_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of rank 0's routed token slots that Switch-style expert capacity dropped in the step (only "
        "with a capacity factor).",
    )
    last_checkpoint: str | None = Field(default=None, description="URI or path of the latest checkpoint.")
    last_checkpoint_step: int | None = Field(default=None, ge=0, description="Step of the latest checkpoint.")
    updated_at: datetime | None = Field(default=None, description="When rank 0 wrote this progress.")
    checkpoint_fallback: CheckpointFallback | None = Field(
        default=None,
        description="Set when this gang's resume fell back past unreadable checkpoints (the operator posts a "
        "CheckpointFallback Warning event); null when it resumed from the newest.",
    )


class Export(ApiModel):
    """The trained model in Hugging Face format, written by rank 0 when the training reached spec.steps."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description="Directory of config.json and sharded safetensors (DeepSeek-V3 / Kimi-K2 tensor names): "
        "file:///path or pvc://<claim>/<path>, as a K2Serving's spec.model.checkpointUri takes it.",
    )
    step: int = Field(ge=0, description="Optimizer step of the exported weights.")
    dtype: DType = Field(description="Dtype the weights are stored in (fp8 runs export bf16).")
    written_at: datetime | None = Field(default=None, description="When rank 0 finished writing the export.")


class K2TrainingStatus(ApiModel):
    """Observed state of a K2Training, written by the operator (and progress by rank 0)."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="metadata.generation the operator last reconciled."
    )
    conditions: list[Condition] = conditions_field(
        "Created, Running, Restarting, Succeeded, Failed, Suspended, CheckpointFallback"
    )
    restarts: int = Field(default=0, ge=0, description="Gang restarts so far (compared with maxRestarts).")
    preemptions: int = Field(
        default=0,
        ge=0,
        description="Gang restarts after a preemption (SIGTERM answered with a checkpoint, or a pod disruption); "
        "not counted in restarts.",
    )
    ready_workers: int = Field(default=0, ge=0, description="Worker pods running and ready.")
    progress: Progress | None = Field(default=None, description="Step, loss, throughput, checkpoint.")
    export: Export | None = Field(default=None, description="The trained model, once the training Succeeded.")
    start_time: datetime | None = Field(default=None, description="When the gang first started running.")
    completion_time: datetime | None = Field(default=None, description="When the training Succeeded or Failed.")


class K2Training(Resource):
    """A K2Training manifest: `K2Training.model_validate(body)` accepts what the API server returns."""

    KIND: ClassVar[str] = KIND
    PLURAL: ClassVar[str] = PLURAL
    SINGULAR: ClassVar[str] = SINGULAR
    SHORT_NAMES: ClassVar[tuple[str, ...]] = SHORT_NAMES

    kind: Literal["K2Training"] = "K2Training"
    spec: K2TrainingSpec
    status: K2TrainingStatus | None = None
