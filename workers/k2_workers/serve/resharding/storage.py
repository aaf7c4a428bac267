"""Where a rank gets the weights of the experts a new placement gives it.

`CheckpointExpertWeights` reads just those experts' tensors from the Hugging Face checkpoint (memory-mapped
safetensors, FP8 dequantised), so a rank never holds more than its slots. `ResidentExpertWeights` keeps every
expert of a model built in memory (a preset with random weights, for demos and tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from k2_workers.model import K2ForCausalLM
from k2_workers.model.checkpoint import CheckpointReader, checkpoint_expert_name
from k2_workers.model.experts import RoutedExperts

ExpertTensors = tuple[Tensor, Tensor, Tensor]  # gate_proj [n, I, D], up_proj [n, I, D], down_proj [n, D, I]


class ExpertWeights(Protocol):
    def experts(self, moe_layer: int, expert_ids: Sequence[int]) -> ExpertTensors: ...


class ResidentExpertWeights:
    """Every expert's weights, taken from a model that holds all of them before it is sharded."""

    def __init__(self, model: K2ForCausalLM) -> None:
        self._layers: list[ExpertTensors] = []
        for moe in model.moe_blocks():
            experts = moe.experts
            if not isinstance(experts, RoutedExperts) or experts.num_slots != experts.num_experts:
                raise ValueError("ResidentExpertWeights needs a model that holds every expert")
            self._layers.append((experts.gate_proj.detach(), experts.up_proj.detach(), experts.down_proj.detach()))

    def experts(self, moe_layer: int, expert_ids: Sequence[int]) -> ExpertTensors:
        gate, up, down = self._layers[moe_layer]
        index = torch.tensor(list(expert_ids), dtype=torch.long, device=gate.device)
        return gate[index], up[index], down[index]


class CheckpointExpertWeights:
    """Reads only the requested experts from the checkpoint, each time a placement asks for them."""

    def __init__(self, checkpoint_dir: str | Path, model: K2ForCausalLM, dtype: torch.dtype) -> None:
        self._reader = CheckpointReader(checkpoint_dir)
        self._config = model.config
        self._layer_indices = list(model.config.moe_layer_indices)
        self._dtype = dtype

    def experts(self, moe_layer: int, expert_ids: Sequence[int]) -> ExpertTensors:
        config = self._config
        prefix = f"model.layers.{self._layer_indices[moe_layer]}.mlp.experts"
        hidden, inter = config.hidden_size, config.moe_intermediate_size
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        stacked = {
            projection: torch.stack(
                [
                    self._reader.read(checkpoint_expert_name(config, prefix, e, projection), shape, self._dtype)
                    for e in expert_ids
                ]
            )
            for projection, shape in shapes.items()
        }
        return stacked["gate_proj"], stacked["up_proj"], stacked["down_proj"]
