"""Record each attention layer's inputs in one forward and feed them back in a later forward.

QK-Clip's guarantee is per layer: on the *same layer input*, a clipped head's max logit becomes tau. In a full forward,
clipping layer 0 also changes what layer 1 sees, so tests replay the recorded inputs to check the guarantee exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from k2_workers.optim import find_mla_attentions

Inputs = dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]]


@contextmanager
def recording_attention_inputs(model: nn.Module) -> Iterator[Inputs]:
    """Within the block, every attention forward stores its (args, kwargs) in the yielded dict."""
    recorded: Inputs = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recorded[module] = (tuple(a.detach().clone() if hasattr(a, "detach") else a for a in args), dict(kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in find_mla_attentions(model)]
    try:
        yield recorded
    finally:
        _remove(handles)


@contextmanager
def replaying_attention_inputs(model: nn.Module, recorded: Inputs) -> Iterator[None]:
    """Within the block, every attention forward runs on the inputs recorded earlier instead of its live ones."""

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return recorded[module]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in find_mla_attentions(model)]
    try:
        yield
    finally:
        _remove(handles)


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
