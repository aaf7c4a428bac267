"""Where a finished training writes its Hugging Face-format export, and the URI `status.export.uri` gives for it.

Pure and torch-free (the config is resolved before torch loads). The export sits beside the checkpoints, in
`<checkpoints>/export`, when they outlive the pods: `spec.checkpointing.uri` (the URI with `/export` appended) or
`spec.checkpointing.claimName` (`pvc://<claim>/export`, the claim being mounted at mountPath). An emptyDir dies with
its pod, so a training without either exports nothing unless `--export-dir` names a directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from k2_api.common import DType
from k2_api.training import Checkpointing
from k2_api.uris import FILE_SCHEME, PVC_SCHEME

EXPORT_DIR_NAME = "export"


@dataclass(frozen=True)
class ExportTarget:
    dir: str
    """Where rank 0 writes, as this process sees it."""
    uri: str
    """What status says: a URI a K2Serving's spec.model.checkpointUri accepts."""


def export_target(checkpointing: Checkpointing, checkpoint_dir: str | None) -> ExportTarget | None:
    """`<checkpoints>/export` when checkpoints outlive the pods; `checkpoint_dir` is where the worker sees them."""
    if checkpointing.uri is not None and checkpoint_dir is not None:
        uri = f"{checkpointing.uri.rstrip('/')}/{EXPORT_DIR_NAME}"
        return ExportTarget(os.path.join(checkpoint_dir, EXPORT_DIR_NAME), uri)
    if checkpointing.claim_name is not None and checkpoint_dir is not None:
        uri = f"{PVC_SCHEME}{checkpointing.claim_name}/{EXPORT_DIR_NAME}"
        return ExportTarget(os.path.join(checkpoint_dir, EXPORT_DIR_NAME), uri)
    return None


def local_export_target(directory: str) -> ExportTarget:
    """`--export-dir DIR`: that directory, as a file:// URI."""
    path = os.path.abspath(directory)
    return ExportTarget(path, f"{FILE_SCHEME}{path}")


def export_dtype(model_dtype: DType | str) -> DType:
    """The dtype an export stores: the model's, except that fp8 runs export bf16 (the writer does not quantise)."""
    dtype = DType(model_dtype)
    return DType.BF16 if dtype == DType.FP8 else dtype
