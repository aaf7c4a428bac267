"""Tiny transformers `DeepseekV3ForCausalLM` checkpoints with random weights, the numerical oracle of the parity tests.

transformers is a test dependency only; nothing in k2_workers imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

K2_YARN = {
    "type": "yarn",
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
DSV3_YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "vocab_size": 256,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Kimi-K2's routing and rope: one group, YaRN factor 32 with beta_fast = beta_slow = 1, one dense layer
    "k2-like": {
        **_TINY,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": 12,
        "num_experts_per_tok": 3,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "rope_theta": 50000.0,
        "rope_scaling": K2_YARN,
        "max_position_embeddings": 131072,
    },
    # DeepSeek-V3's: group-limited routing, two dense layers, YaRN factor 40 with beta_fast 32
    "deepseek-like": {
        **_TINY,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 2,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": DSV3_YARN,
        "max_position_embeddings": 163840,
    },
    # plain RoPE, plain q_proj (no q LoRA), two shared experts, no top-k normalisation
    "no-rope-scaling": {
        **_TINY,
        "q_lora_rank": None,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
    },
}


def build_hf_model(fields: dict[str, Any], seed: int = 0) -> Any:
    """An eager-mode transformers model with non-trivial random weights and non-zero router correction biases."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**fields, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("gate.weight"):
                param.normal_(0.0, 0.3)
            else:
                param.normal_(0.0, 0.08)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.2 * torch.randn_like(buffer))
    return model


def save_hf_checkpoint(fields: dict[str, Any], directory: Path, seed: int = 0) -> Any:
    model = build_hf_model(fields, seed)
    model.save_pretrained(directory)
    return model
