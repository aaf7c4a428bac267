"""The real K2 model in its tiny ``k2-debug`` preset, for optimizer tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from k2_workers.model import K2Config, K2ForCausalLM


def debug_config(**overrides: Any) -> K2Config:
    return dataclasses.replace(K2Config.from_preset("k2-debug"), **overrides)


def debug_model(seed: int = 0, **overrides: Any) -> K2ForCausalLM:
    torch.manual_seed(seed)
    model = K2ForCausalLM(debug_config(**overrides))
    model.train()
    return model


def set_random_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
