"""Closed-form parameter counts: total (all experts) and activated per token (top-k + shared experts).

Router correction biases are buffers, not parameters: `include_router_bias` adds them. Multi-token-prediction
layers (num_nextn_predict_layers) are not part of the main model and are not counted.
"""

from __future__ import annotations

from k2_workers.model.config import K2Config


def attention_parameters(c: K2Config) -> int:
    if c.attention_type == "gqa":
        return gqa_attention_parameters(c)
    h, n_h = c.hidden_size, c.num_attention_heads
    q_out = n_h * c.qk_head_dim
    q = h * q_out if c.q_lora_rank is None else h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * q_out
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * n_h * (c.qk_nope_head_dim + c.v_head_dim)
    bias = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + h if c.attention_bias else 0
    return q + kv + n_h * c.v_head_dim * h + bias


def gqa_attention_parameters(c: K2Config) -> int:
    """q_proj and o_proj [H·K, D], k_proj and v_proj [G·K, D], plus their biases."""
    q_width, kv_width = c.num_attention_heads * c.gqa_head_dim, c.num_key_value_heads * c.gqa_head_dim
    bias = q_width + 2 * kv_width + c.hidden_size if c.attention_bias else 0
    return 2 * c.hidden_size * q_width + 2 * c.hidden_size * kv_width + bias


def _swiglu(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def _count(c: K2Config, experts_per_moe_layer: int) -> int:
    h = c.hidden_size
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    per_layer = attention_parameters(c) + 2 * h
    num_moe = len(c.moe_layer_indices)
    num_dense = c.num_hidden_layers - num_moe
    moe = (experts_per_moe_layer + c.n_shared_experts) * _swiglu(h, c.moe_intermediate_size)
    moe += c.n_routed_experts * h  # router weight
    return (
        embeddings + h + c.num_hidden_layers * per_layer + num_dense * _swiglu(h, c.intermediate_size) + num_moe * moe
    )


def total_parameters(config: K2Config, include_router_bias: bool = False) -> int:
    """All parameters (1,026,408,209,408 for kimi-k2, 46,702,792,704 for mixtral-8x7b)."""
    bias = len(config.moe_layer_indices) * config.n_routed_experts if include_router_bias else 0
    return _count(config, config.n_routed_experts) + bias


def activated_parameters(config: K2Config) -> int:
    """Parameters used per token, input embedding included (32,861,477,888 for kimi-k2, 12,879,925,248 for
    mixtral-8x7b)."""
    return _count(config, config.num_experts_per_tok)
