"""The resolved run configuration: a K2Training manifest plus command-line overrides.

`resolve_config(manifest, overrides)` is pure: it reads the manifest's `spec` (the same YAML users apply; the operator
mounts it in the pods), validated by the `K2Training` API model, and returns the `RunConfig` the loop uses. Only
`_from_manifest` knows the manifest layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k2_api import claims, uris
from k2_api.training import K2Training
from k2_workers.train.export_target import export_dtype, export_target


@dataclass(frozen=True)
class RunConfig:
    name: str = "local"
    namespace: str = ""
    # model: a preset or an inline HF config, optionally with weights (and tiktoken.model) to start from
    model_preset: str | None = "k2-debug"
    model_hf_config: dict[str, Any] | None = None
    model_checkpoint: str | None = None
    # data
    dataset: str = "builtin:synthetic"
    seq_len: int = 64
    micro_batch_size: int = 4  # sequences per rank per step
    seed: int = 0
    # optimisation: MuonClip with the WSD schedule (warmup, constant, cosine decay over the last decay_steps)
    steps: int = 100
    stop_after: int | None = None  # stop (with a checkpoint) after this step, the schedule still sized by `steps`
    lr: float = 2e-3
    adam_lr: float | None = None  # default: lr
    warmup_steps: int = 10
    decay_steps: int = 20
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    momentum: float = 0.95
    qk_clip_tau: float = 100.0
    grad_clip: float = 1.0  # global gradient-norm bound; 0 = no clipping
    router_bias_update_rate: float = 1e-3  # u of the loss-free balancing rule
    aux_loss_alpha: float = 0.0  # Switch auxiliary loss weight; 0 = off
    expert_parallel: int = 1  # ranks sharing one copy of the experts (k2_workers.parallel); must divide the world
    # checkpoints
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0 = only at the end and on SIGTERM
    keep_last: int = 2
    # the Hugging Face-format export written when `steps` is reached (train/export.py); no export_dir: none
    export_dir: str | None = None
    export_uri: str | None = None  # what status.export.uri says (default file://export_dir)
    export_dtype: str = "fp32"
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    metrics_port: int = 0  # 0 = no metrics server
    status_interval_s: float = 10.0
    progress_bar: bool = False  # a terminal's progress bar instead of one JSON line per step (train/progress.py)
    process_group_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        positive = ("seq_len", "micro_batch_size", "steps", "keep_last", "expert_parallel")
        for field in positive:
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        non_negative = ("lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "checkpoint_every")
        for field in non_negative:
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if (self.model_preset is None) == (self.model_hf_config is None):
            raise ValueError("model: exactly one of a preset or an inline config")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.process_group_timeout_s <= 0:
            raise ValueError("process_group_timeout_s must be > 0")
        if self.export_dtype not in ("fp32", "bf16"):
            raise ValueError(f"export_dtype must be fp32 or bf16, got {self.export_dtype!r}")


def _from_manifest(manifest: Mapping[str, Any], in_cluster: bool) -> dict[str, Any]:
    """RunConfig fields from a K2Training manifest (validated by the API model, so errors name the field)."""
    training = K2Training.model_validate(manifest)
    spec = training.spec
    values: dict[str, Any] = {
        "name": training.metadata.name or "local",
        "namespace": training.metadata.namespace or "",
        "model_preset": spec.model.preset,
        "model_hf_config": spec.model.config.model_dump() if spec.model.config is not None else None,
        "dataset": f"builtin:{spec.data.corpus}" if spec.data.corpus else _data_path(spec.data.uri),
        "seq_len": spec.data.seq_len,
        "micro_batch_size": spec.data.batch_size,
        "seed": spec.data.seed,
        "steps": spec.steps,
        "lr": spec.optimizer.lr,
        "adam_lr": spec.optimizer.adam_lr,
        "weight_decay": spec.optimizer.weight_decay,
        "momentum": spec.optimizer.momentum,
        "qk_clip_tau": spec.optimizer.qk_clip_tau,
        "warmup_steps": spec.optimizer.warmup_steps,
        "decay_steps": spec.optimizer.decay_steps,
        "final_lr_ratio": spec.optimizer.final_lr_ratio,
        "grad_clip": spec.optimizer.grad_clip,
        "router_bias_update_rate": spec.optimizer.router_bias_update_rate,
        "aux_loss_alpha": spec.optimizer.aux_loss_alpha,
        "expert_parallel": spec.parallelism.expert_parallel,
        "checkpoint_every": spec.checkpointing.every_n_steps,
        "keep_last": spec.checkpointing.keep_last,
    }
    if spec.model.checkpoint_uri:
        values["model_checkpoint"] = claims.local_path(spec.model.checkpoint_uri, "spec.model.checkpointUri")
    if spec.checkpointing.uri is not None:
        values["checkpoint_dir"] = uris.local_only(spec.checkpointing.uri, "spec.checkpointing.uri")
    elif in_cluster:  # the operator mounts the claim (or an emptyDir) there
        values["checkpoint_dir"] = spec.checkpointing.mount_path
    target = export_target(spec.checkpointing, values.get("checkpoint_dir"))
    if target is not None:
        values["export_dir"], values["export_uri"] = target.dir, target.uri
    values["export_dtype"] = export_dtype(spec.model.dtype).value
    return values


def _data_path(uri: str | None) -> str:
    assert uri is not None, "the API guarantees a corpus or a uri"
    return claims.local_path(uri, "spec.data.uri")


def resolve_config(
    manifest: Mapping[str, Any] | None, overrides: Mapping[str, Any], in_cluster: bool = False
) -> RunConfig:
    """Manifest values, then every non-None override (RunConfig field names). Outside a cluster the manifest's
    mounted checkpoint path is not used: local runs checkpoint only where --checkpoint-dir (or a file:// uri) says."""
    values = _from_manifest(manifest, in_cluster) if manifest is not None else {}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown override {key!r}")
        if value is not None:
            values[key] = value
    return RunConfig(**values)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The first K2Training document of a YAML file."""
    with open(path) as f:
        documents = [d for d in yaml.safe_load_all(f) if d]
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "K2Training":
            return document
    raise ValueError(f"{path}: no K2Training document found")
