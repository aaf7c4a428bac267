"""Every name and number the operator, the EPLB controller and the workers share, each defined once.

Style: each group of names is a class used as a namespace (never instantiated) whose attributes are plain `str` or
`int` constants, so they go straight into manifests, env lists and PromQL: `Annotations.APPLIED_GENERATION`,
`Labels.GROUP`, `Ports.METRICS`, `Env.GROUP`, `Files.PLACEMENT`, `Metrics.EXPERT_TOKENS.name`,
`TrainingMetrics.STEP_SECONDS.name`, `FieldManagers.EPLB`. Per-preset model numbers are frozen dataclasses in
`PRESET_SHAPES`; `moe_shape(spec)` resolves any `ModelSpec` (preset or inline config) the way the workers build it.

This module imports no torch and nothing of ours but `k2_api.common`: the operator and the EPLB controller read it
without the workers installed. `tests/model/test_contract_bytes.py` builds every preset's model and checks the shapes
and bytes below against the real parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from k2_api.common import DType, ModelSpec, Preset

# --- Kubernetes metadata -------------------------------------------------------------------------------------------


class Labels:
    """Label keys the operator puts on children (and nodes) and selects by."""

    KIND: Final = "k2.ai/kind"
    """Which K2 kind owns a child (K2Training, K2Serving, ExpertPlacement); the child watch maps events back with it."""
    GROUP: Final = "k2.ai/group"
    """Expert-parallel group index of a serving rank's Service, StatefulSet and Pods."""
    ATTEMPT: Final = "k2.ai/attempt"
    """Gang attempt of a training Job (0 for the first run, +1 per gang restart)."""
    RACK: Final = "k2.ai/rack"
    """Node label of the local cluster's fake nodes (topology for schedulers and EPLB)."""


class Annotations:
    """Annotation keys written or read by more than one component."""

    PROPAGATED_PREFIX: Final = "k2.ai/"
    """Annotations with this prefix on a K2 resource are copied onto its worker pods (scheduler hints, test hooks)."""
    APPLIED_GENERATION: Final = "k2.ai/applied-placement-generation"
    """Set by each serving rank on its own Pod once it serves with that ExpertPlacement generation."""
    TEMPLATE_HASH: Final = "k2.ai/template-hash"
    """Hash of a serving group's pod template inputs; a change restarts the group."""
    GANG: Final = "k2.ai/gang"
    """On a serving group's StatefulSet: the operator's record of the group's gang (members, restarts, backoff), JSON
    (`k2_operator.gang.GangRecord`)."""
    CONFIG_HASH: Final = "k2.ai/config-hash"
    """Hash of a training's mounted config; a change rolls the Job's pods."""
    REBALANCED_AT: Final = "eplb.k2.ai/rebalanced-at"
    """Set by the EPLB controller on an ExpertPlacement when it writes a generation (RFC 3339)."""
    FAKE_RUN_DURATION: Final = "k2.ai/fake-run-duration"
    """kwok only (hack/kwok-stages.yaml): how long a Job-owned fake pod stays Running before it succeeds."""
    FAKE_FAIL: Final = "k2.ai/fake-fail"
    """kwok only (hack/kwok-stages.yaml): a Running fake pod with this annotation fails with exit code 1."""
    FAKE_EXIT_CODE: Final = "k2.ai/fake-exit-code"
    """kwok only: the exit code a FAKE_FAIL pod fails with (default 1)."""
    FAKE_TERMINATION_MESSAGE: Final = "k2.ai/fake-termination-message"
    """kwok only: the termination message a FAKE_FAIL pod fails with."""
    FAKE_SIGTERM_EXIT_CODE: Final = "k2.ai/fake-sigterm-exit-code"
    """kwok only: the exit code a deleted Running fake pod ends Failed with (default 143: SIGTERM unhandled)."""


class FieldManagers:
    """Server-side apply field managers; also the components' names (Event source, managed-by label)."""

    OPERATOR: Final = "k2-operator"
    EPLB: Final = "k2-eplb"


# --- network ---------------------------------------------------------------------------------------------------------


class Ports:
    """Container and Service ports."""

    RENDEZVOUS: Final = 29500
    """torch.distributed rendezvous on rank 0 (MASTER_PORT), for serving groups and training gangs."""
    RANK_HTTP: Final = 8001
    """A serving rank's HTTP server (/healthz; rank 0 also serves generation requests)."""
    METRICS: Final = 9400
    """Prometheus /metrics of serving ranks and training rank 0."""
    FRONTEND: Final = 8000
    """Default port of a serving's frontend (spec.frontend.port)."""
    GRPC: Final = 50051
    """gRPC of a serving rank (grpc.health.v1, reflection; rank 0 also k2.serve.v1.Generation) and of the frontend."""
    OPERATOR_METRICS: Final = 8080
    """Default /metrics and /healthz port of the operator process."""


class PortNames:
    """Names of the container ports; the EPLB controller finds a rank's metrics port by `METRICS`."""

    RENDEZVOUS: Final = "rendezvous"
    HTTP: Final = "http"
    GRPC: Final = "grpc"
    METRICS: Final = "metrics"


class GrpcServices:
    """gRPC service names that another component asks for (the operator's `grpc:` readiness probes)."""

    GENERATION: Final = "k2.serve.v1.Generation"
    """The generation service of a serving rank 0 and of the frontend; its health status is readiness."""


class HttpPaths:
    """HTTP paths of the serving processes that another component calls."""

    HEALTHZ: Final = "/healthz"
    """Readiness of a serving rank (200 once a placement is applied) and of the frontend: the pods' readinessProbe."""


# --- what the operator hands the workers ----------------------------------------------------------------------------


class Env:
    """Environment variables the operator sets on worker pods and the workers read (plus local-run overrides)."""

    SERVING_NAME: Final = "K2_SERVING_NAME"
    NAMESPACE: Final = "K2_NAMESPACE"
    POD_NAME: Final = "K2_POD_NAME"
    GROUP: Final = "K2_GROUP"
    """Expert-parallel group index of a serving rank."""
    PLACEMENT_NAME: Final = "K2_PLACEMENT_NAME"
    GROUP_ENDPOINTS: Final = "K2_GROUP_ENDPOINTS"
    """Comma-separated rank-0 URLs of every group, for the frontend."""
    TRAINING_NAME: Final = "K2_TRAINING_NAME"
    RESTART_ATTEMPT: Final = "K2_RESTART_ATTEMPT"
    METRICS_PORT: Final = "K2_METRICS_PORT"
    COLLECTIVE_TIMEOUT_S: Final = "K2_COLLECTIVE_TIMEOUT_S"
    """Seconds a serving rank's collectives may block (default 120); not set by the operator."""
    LISTEN_HOST: Final = "K2_LISTEN_HOST"
    """Address a serving process or training rank 0's /metrics listens on (default 0.0.0.0); not set by the operator."""
    TERMINATION_LOG: Final = "K2_TERMINATION_LOG"
    """Where a training worker writes why it stopped (the pod's terminationMessagePath); unset: nowhere."""


class TorchrunEnv:
    """torchrun's standard variables, which the operator sets itself (one process per pod)."""

    RANK: Final = "RANK"
    LOCAL_RANK: Final = "LOCAL_RANK"
    WORLD_SIZE: Final = "WORLD_SIZE"
    MASTER_ADDR: Final = "MASTER_ADDR"
    MASTER_PORT: Final = "MASTER_PORT"
    NNODES: Final = "NNODES"
    NPROC_PER_NODE: Final = "NPROC_PER_NODE"
    NODE_RANK: Final = "NODE_RANK"
    LOCAL_WORLD_SIZE: Final = "LOCAL_WORLD_SIZE"
    """Set by the workers' own launcher for the ranks it starts, not by the operator."""
    USE_AGENT_STORE: Final = "TORCHELASTIC_USE_AGENT_STORE"
    """Set by torchrun itself (never by the operator): its agent runs the rendezvous store the ranks join."""


class Files:
    """Mount points and file names of what the operator mounts into worker pods."""

    CONFIG_DIR: Final = "/etc/k2"
    """The resource's ConfigMap (read-only)."""
    PLACEMENT_DIR: Final = "/etc/k2/placement"
    """The `<placement>-active` ConfigMap of a serving (read-only; kubelet refreshes it in place)."""
    CLAIMS_ROOT: Final = "/var/run/k2/claims"
    """Every claim a `pvc://<claim>/<path>` URI names is mounted read-only at CLAIMS_ROOT/<claim> (k2_api.claims)."""
    SERVING_CONFIG: Final = "serving.yaml"
    """The K2Serving manifest, in CONFIG_DIR."""
    TRAINING_CONFIG: Final = "training.yaml"
    """The K2Training manifest, in CONFIG_DIR."""
    MODEL: Final = "model.json"
    """The resolved model of a serving (spec.model, its MoE shape and slot layout), in CONFIG_DIR."""
    PLACEMENT: Final = "placement.json"
    """The placement in force, in PLACEMENT_DIR."""
    TERMINATION_LOG: Final = "/dev/termination-log"
    """A training container's terminationMessagePath: the kubelet copies it into the pod's terminated state."""
    TERMINATION_MESSAGE_MAX_BYTES: Final = 4096
    """The kubelet keeps at most this much of a termination message."""


class ExitCodes:
    """Exit codes of the workers that the operator tells apart: `k2 worker train`'s through the Job's
    podFailurePolicy, a serving rank's GROUP_BROKEN through the gang restart of its group."""

    SUCCEEDED: Final = 0
    """spec.steps reached (or --stop-after, a local experiment)."""
    CRASHED: Final = 1
    """An exception: the termination message names it. Counts against failurePolicy.maxRestarts."""
    INVALID_CONFIG: Final = 2
    """The manifest or the flags were rejected before training started."""
    PREEMPTED: Final = 75
    """SIGTERM: the step finished and a checkpoint was written (EX_TEMPFAIL). The gang restarts, uncounted."""
    GROUP_BROKEN: Final = 3
    """A serving rank whose group lost its lockstep (a peer died or failed): the operator restarts the whole group."""


# --- metrics the ranks export and the EPLB controller reads --------------------------------------------------------


class MetricLabels:
    SERVING: Final = "serving"
    GROUP: Final = "group"
    """Expert-parallel group index."""
    RANK: Final = "rank"
    """Rank inside its group."""
    LAYER: Final = "layer"
    """MoE layer index in ExpertPlacement.spec.layers (0-based, dense layers not counted)."""
    EXPERT: Final = "expert"
    """Logical expert id."""
    SLOT: Final = "slot"
    """Slot index on the rank."""
    SOURCE: Final = "source"
    """Where expert weights came from: one of `WeightSources`."""
    TRAINING: Final = "training"
    """Name of the K2Training a training rank 0 exports metrics for."""
    CACHE_STATE: Final = "state"
    """State of paged-cache blocks: "used" or "free"."""


class WeightSources:
    PEER: Final = "peer"
    """Sent by another rank of the group."""
    STORAGE: Final = "storage"
    """Read from the checkpoint."""
    ALL: Final = (PEER, STORAGE)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its exposition name (with `_total` for counters), its label names and its help text."""

    name: str
    labels: tuple[str, ...]
    help: str

    @property
    def family(self) -> str:
        """The name prometheus_client's metric families take (a counter's name without `_total`)."""
        return self.name.removesuffix("_total")


_RANK = (MetricLabels.SERVING, MetricLabels.GROUP, MetricLabels.RANK)


class Metrics:
    """Counters every serving rank exports; the EPLB controller plans from the first two."""

    EXPERT_TOKENS: Final = MetricSpec(
        "k2_expert_tokens_total",
        (*_RANK, MetricLabels.LAYER, MetricLabels.EXPERT),
        "Tokens routed to a logical expert.",
    )
    SLOT_TOKENS: Final = MetricSpec(
        "k2_slot_tokens_total", (*_RANK, MetricLabels.LAYER, MetricLabels.SLOT), "Tokens processed by an expert slot."
    )
    EXPERT_WEIGHT_BYTES: Final = MetricSpec(
        "k2_expert_weight_bytes_total",
        (*_RANK, MetricLabels.SOURCE),
        "Bytes of expert weights taken in to apply placements, by source (peer rank or storage).",
    )


class EngineMetrics:
    """What serving rank 0 exports about its continuously batched engine: its queue, batch, paged cache, latencies."""

    QUEUED: Final = MetricSpec("k2_serving_queued_requests", _RANK, "Requests in the queue, not yet in the batch.")
    WAITING: Final = MetricSpec(
        "k2_serving_waiting_sequences", _RANK, "Sequences waiting to run: queued, or preempted and waiting again."
    )
    RUNNING: Final = MetricSpec("k2_serving_running_sequences", _RANK, "Sequences in the running batch.")
    CACHE_BLOCKS: Final = MetricSpec(
        "k2_serving_cache_blocks",
        (*_RANK, MetricLabels.CACHE_STATE),
        "Blocks of the paged cache, by state (used or free).",
    )
    CACHE_CAPACITY: Final = MetricSpec(
        "k2_serving_cache_capacity_tokens", _RANK, "Tokens the paged cache holds when full."
    )
    PREEMPTIONS: Final = MetricSpec(
        "k2_serving_preemptions_total", _RANK, "Sequences preempted for cache blocks (recomputed later)."
    )
    PREFIX_BLOCKS: Final = MetricSpec(
        "k2_serving_prefix_reused_blocks_total", _RANK, "Cache blocks taken from a shared prefix, not computed."
    )
    TTFT: Final = MetricSpec(
        "k2_serving_time_to_first_token_seconds", _RANK, "From a request's arrival to its first token."
    )
    TPOT: Final = MetricSpec(
        "k2_serving_time_per_output_token_seconds", _RANK, "A request's decode time over its tokens after the first."
    )


_TRAINING = (MetricLabels.TRAINING,)


class TrainingMetrics:
    """What rank 0 of a training gang exports on `Ports.METRICS` (gauges describe the last completed step)."""

    STEP: Final = MetricSpec("k2_train_step", _TRAINING, "Last completed optimizer step.")
    STEPS: Final = MetricSpec("k2_train_steps", _TRAINING, "Optimizer steps of the whole run (spec.steps).")
    LOSS: Final = MetricSpec("k2_train_loss", _TRAINING, "Training loss of the last step (mean over ranks).")
    LEARNING_RATE: Final = MetricSpec("k2_train_learning_rate", _TRAINING, "Learning rate of the last step.")
    STEP_SECONDS: Final = MetricSpec(
        "k2_train_step_seconds", _TRAINING, "Wall time of the last optimizer step (forward, backward, update)."
    )
    TOKENS_PER_SECOND: Final = MetricSpec(
        "k2_train_tokens_per_second", _TRAINING, "Global training throughput of the last step (all ranks)."
    )
    MAX_ATTENTION_LOGIT: Final = MetricSpec(
        "k2_train_max_attention_logit", _TRAINING, "Largest pre-softmax attention logit of the last step."
    )
    QK_CLIPPED_HEADS: Final = MetricSpec(
        "k2_train_qk_clipped_heads", _TRAINING, "Attention heads QK-Clip rescaled in the last step."
    )
    GRAD_NORM: Final = MetricSpec("k2_train_grad_norm", _TRAINING, "Global gradient norm before clipping.")
    LAST_CHECKPOINT_STEP: Final = MetricSpec(
        "k2_train_last_checkpoint_step", _TRAINING, "Step of the newest complete checkpoint."
    )
    TOKENS: Final = MetricSpec("k2_train_tokens_total", _TRAINING, "Tokens trained on (all ranks).")
    EXPERT_TOKENS: Final = MetricSpec(
        "k2_train_expert_tokens_total",
        (*_TRAINING, MetricLabels.LAYER, MetricLabels.EXPERT),
        "Tokens routed to a logical expert during training (all ranks).",
    )


# --- per preset: the MoE shape and the bytes of one routed expert --------------------------------------------------

FP8_BLOCK: Final = (128, 128)
"""Block of one FP8 scale (DeepSeek-V3 block-wise FP8: one fp32 `weight_scale_inv` per 128 x 128 block)."""
DTYPE_BYTES: Final = {DType.FP8: 1, DType.BF16: 2, DType.FP32: 4}
"""Bytes of one weight in each dtype (fp8 weights only; their scales are counted by `expert_bytes`)."""


def expert_bytes(hidden_size: int, moe_intermediate_size: int, dtype: DType | str) -> int:
    """Bytes of one routed expert (gate_proj, up_proj: [I, H]; down_proj: [H, I]) stored in `dtype`.

    bf16 and fp32: 3 x H x I x (2 or 4). fp8 counts what a block-wise FP8 checkpoint stores for the expert: one byte
    per weight plus, for each of the three matrices, one fp32 `weight_scale_inv` per started 128 x 128 block
    (3 x ceil(I/128) x ceil(H/128) x 4 bytes). This is what moving an expert copies when its weights are read as
    stored; a rank that dequantised them on load holds them in its serving dtype instead.
    """
    if hidden_size < 1 or moe_intermediate_size < 1:
        raise ValueError(f"hidden_size, moe_intermediate_size: {hidden_size}, {moe_intermediate_size} must be >= 1")
    weights = 3 * hidden_size * moe_intermediate_size
    dtype = DType(dtype)
    if dtype != DType.FP8:
        return weights * DTYPE_BYTES[dtype]
    blocks = math.ceil(moe_intermediate_size / FP8_BLOCK[0]) * math.ceil(hidden_size / FP8_BLOCK[1])
    return weights * DTYPE_BYTES[DType.FP8] + 3 * blocks * DTYPE_BYTES[DType.FP32]


@dataclass(frozen=True)
class MoeShape:
    """The MoE numbers of a model, with the field names of the Hugging Face config.json.

    Every preset has an MoE block in each layer after the first `first_k_dense_replace` (moe_layer_freq 1).
    """

    num_hidden_layers: int
    """Transformer layers, dense and MoE."""
    first_k_dense_replace: int
    """Leading dense layers."""
    n_routed_experts: int
    """Routed experts per MoE layer."""
    num_experts_per_tok: int
    """Experts each token is routed to (top-k)."""
    hidden_size: int
    moe_intermediate_size: int
    """Width of one routed expert."""

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def expert_bytes(self, dtype: DType | str) -> int:
        """Bytes of one routed expert in `dtype` (see `expert_bytes`)."""
        return expert_bytes(self.hidden_size, self.moe_intermediate_size, dtype)


PRESET_SHAPES: Final = {
    Preset.KIMI_K2: MoeShape(
        num_hidden_layers=61,
        first_k_dense_replace=1,
        n_routed_experts=384,
        num_experts_per_tok=8,
        hidden_size=7168,
        moe_intermediate_size=2048,
    ),
    Preset.DEEPSEEK_V3: MoeShape(
        num_hidden_layers=61,
        first_k_dense_replace=3,
        n_routed_experts=256,
        num_experts_per_tok=8,
        hidden_size=7168,
        moe_intermediate_size=2048,
    ),
    Preset.K2_DEBUG: MoeShape(
        num_hidden_layers=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        hidden_size=64,
        moe_intermediate_size=32,
    ),
    Preset.MIXTRAL_8X7B: MoeShape(
        num_hidden_layers=32,
        first_k_dense_replace=0,
        n_routed_experts=8,
        num_experts_per_tok=2,
        hidden_size=4096,
        moe_intermediate_size=14336,
    ),
    Preset.MIXTRAL_DEBUG: MoeShape(
        num_hidden_layers=3,
        first_k_dense_replace=0,
        n_routed_experts=8,
        num_experts_per_tok=2,
        hidden_size=64,
        moe_intermediate_size=32,
    ),
}
"""The MoE shape of each preset (k2_workers.model.K2Config.from_preset builds its MoE from these)."""

DEFAULT_SHAPE: Final = PRESET_SHAPES[Preset.KIMI_K2]
"""What an inline config gets for an MoE field it leaves out: the workers' defaults are Kimi-K2's."""


def moe_shape(model: ModelSpec) -> MoeShape:
    """The MoE shape the workers build for `model`: a preset's, or the inline config's with Kimi-K2 defaults."""
    if model.config is None:
        assert model.preset is not None, "the API guarantees exactly one of preset or config"
        return PRESET_SHAPES[Preset(model.preset)]
    config = model.config
    return MoeShape(
        num_hidden_layers=config.num_hidden_layers,
        first_k_dense_replace=_default(config.first_k_dense_replace, DEFAULT_SHAPE.first_k_dense_replace),
        n_routed_experts=config.n_routed_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        hidden_size=_default(config.hidden_size, DEFAULT_SHAPE.hidden_size),
        moe_intermediate_size=_default(config.moe_intermediate_size, DEFAULT_SHAPE.moe_intermediate_size),
    )


def _default(value: int | None, default: int) -> int:
    return default if value is None else value
