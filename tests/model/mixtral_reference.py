"""Tiny transformers `MixtralForCausalLM` checkpoints with random weights, the numerical oracle of the Mixtral tests.

transformers is a test dependency only; nothing in k2_workers imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_TINY: dict[str, Any] = {"vocab_size": 256, "bos_token_id": 0, "eos_token_id": 1, "max_position_embeddings": 4096}
TINY_MIXTRAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Mixtral's shape, scaled down: 8 experts top-2, 4 query heads sharing 2 KV heads, RoPE theta 1e6
    "mixtral-like": {
        **_TINY,
        "hidden_size": 64,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
    },
    # 3 query heads per KV head, head_dim (16) != hidden / heads (8), a sliding window shorter than the test
    # sequences, top-3 of 6 experts, tied embeddings
    "gqa-window": {
        **_TINY,
        "hidden_size": 48,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 6,
        "num_experts_per_tok": 3,
        "sliding_window": 16,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}


def build_hf_mixtral(fields: dict[str, Any], seed: int = 0) -> Any:
    """An eager-mode transformers Mixtral with non-trivial random weights (norms near 1, a sharp router)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**fields, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("gate.weight"):
                param.normal_(0.0, 0.3)
            else:
                param.normal_(0.0, 0.08)
    return model


def save_hf_mixtral(fields: dict[str, Any], directory: Path, seed: int = 0) -> Any:
    model = build_hf_mixtral(fields, seed)
    model.save_pretrained(directory)
    return model
