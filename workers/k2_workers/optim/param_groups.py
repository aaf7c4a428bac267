"""Which optimizer updates which K2 parameter: a pure decision on the parameter's name and shape."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from torch import Tensor, nn

ParamKind = Literal["muon", "adamw", "frozen"]

#: Modules whose matrices are lookup tables or the output head, not hidden linear maps: AdamW, as Moonlight does.
ADAMW_MATRIX_MODULES = frozenset({"embed_tokens", "lm_head"})
#: Trained outside the gradient (the loss-free router bias update), never by the optimizer.
FROZEN_NAMES = frozenset({"e_score_correction_bias"})


def classify_parameter(name: str, param: Tensor) -> ParamKind:
    """Muon for hidden weight matrices (2-D, or stacked ``[E, rows, cols]`` experts: every trailing matrix is one
    Muon matrix); AdamW for embeddings, the output head, norms and biases; ``frozen`` for the router bias and
    parameters that do not require a gradient."""
    parts = name.split(".")
    if not param.requires_grad or FROZEN_NAMES.intersection(parts):
        return "frozen"
    if ADAMW_MATRIX_MODULES.intersection(parts):
        return "adamw"
    return "muon" if param.ndim >= 2 else "adamw"


def split_parameters(
    named_params: Iterable[tuple[str, nn.Parameter]],
) -> dict[ParamKind, list[tuple[str, nn.Parameter]]]:
    """Groups ``model.named_parameters()`` by :func:`classify_parameter`, keeping the model's order."""
    groups: dict[ParamKind, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": [], "frozen": []}
    for name, param in named_params:
        groups[classify_parameter(name, param)].append((name, param))
    return groups
