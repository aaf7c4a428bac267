"""Mixtral's published formats: its config.json keys and its checkpoint tensor names, as pure translations.

Mixtral (Mistral AI, 2023) is the model type `mixtral`: grouped-query attention with RoPE over the whole head
(rotate-half pairs), one softmax top-2 router per layer (`block_sparse_moe.gate`), eight SwiGLU experts
(`block_sparse_moe.experts.E.w1/w2/w3` = gate/down/up), no dense layers and no shared expert. In memory the model
keeps K2's module names (`mlp.gate`, `mlp.experts.gate_proj[E]`); only these functions know Mixtral's.

This module imports nothing of the model, so `config` can use it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"

# K2 expert projection -> Mixtral's expert tensor.
EXPERT_PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

# The K2Config fields that Mixtral fixes (its config.json cannot express anything else for them).
FIXED_FIELDS: dict[str, Any] = {
    "attention_type": "gqa",
    "q_lora_rank": None,
    "rope_interleave": False,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "n_shared_experts": 0,
    "n_group": 1,
    "topk_group": 1,
    "model_type": MODEL_TYPE,
}
# Routing fields Mixtral fixes but we let a config change (Switch-style top-1 with capacity on Mixtral's layout);
# to_hf_config writes them only when they differ from Mixtral's.
ROUTING_DEFAULTS: dict[str, Any] = {
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "capacity_factor": None,
}
# config.json key -> K2Config field, for the keys that keep their meaning.
_SAME_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts_per_tok",
    "sliding_window",
    "rope_theta",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "torch_dtype",
)
_RENAMED = {"num_local_experts": "n_routed_experts", "router_aux_loss_coef": "aux_loss_alpha"}
_CONSUMED = frozenset({*_SAME_KEYS, *_RENAMED, "intermediate_size", "model_type", "rope_scaling", *ROUTING_DEFAULTS})
_BOOKKEEPING = frozenset({"architectures", "transformers_version", "dtype", "output_router_logits"})
# What a Mixtral config.json means by a key it leaves out (transformers' MixtralConfig defaults), not K2's defaults.
_MIXTRAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}


def is_mixtral(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == MODEL_TYPE


def fields_from_hf(hf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(K2Config keyword arguments, extra keys) for a Mixtral config.json dict (transformers 4.x or 5.x form)."""
    hf = {**_MIXTRAL_DEFAULTS, **copy.deepcopy(hf)}
    if "rope_parameters" in hf:  # transformers >= 5 folds rope_theta (and any scaling) into rope_parameters
        params = dict(hf.pop("rope_parameters") or {})
        if "rope_theta" in params:
            hf["rope_theta"] = params.pop("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        hf["rope_scaling"] = None if rope_type == "default" else params
    if "dtype" in hf and "torch_dtype" not in hf:
        hf["torch_dtype"] = hf["dtype"]
    fields: dict[str, Any] = {k: hf[k] for k in _SAME_KEYS if k in hf}
    fields.update({ours: hf[theirs] for theirs, ours in _RENAMED.items()})
    if "intermediate_size" in hf:  # Mixtral's intermediate_size is the width of one expert
        fields["intermediate_size"] = fields["moe_intermediate_size"] = hf["intermediate_size"]
    if fields.get("num_key_value_heads") is None and "num_attention_heads" in fields:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields["rope_scaling"] = hf.get("rope_scaling")
    fields.update(FIXED_FIELDS)
    fields.update({k: hf.get(k, default) for k, default in ROUTING_DEFAULTS.items()})
    extra = {k: v for k, v in hf.items() if k not in _CONSUMED and k not in _BOOKKEEPING}
    return fields, extra


def hf_from_fields(fields: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The Mixtral config.json dict of a config's fields (legacy `rope_theta` form, as the published one)."""
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], **copy.deepcopy(extra)}
    out.update({k: copy.deepcopy(fields[k]) for k in _SAME_KEYS})
    out.update({theirs: fields[ours] for theirs, ours in _RENAMED.items()})
    out["intermediate_size"] = fields["moe_intermediate_size"]
    out["model_type"] = MODEL_TYPE
    if fields["rope_scaling"] is not None:
        out["rope_scaling"] = copy.deepcopy(fields["rope_scaling"])
    out.update({k: fields[k] for k, default in ROUTING_DEFAULTS.items() if fields[k] != default})
    return out


# --- tensor names ------------------------------------------------------------------------------------------------
_ROUTER = re.compile(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$")
_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts$")


def tensor_name(name: str) -> str:
    """The checkpoint name of a non-expert tensor of the model (the router moves to `block_sparse_moe.gate`)."""
    return _ROUTER.sub(r"\1.block_sparse_moe.gate.weight", name)


def expert_tensor_name(prefix: str, expert_id: int, projection: str) -> str:
    """`model.layers.L.mlp.experts` + (E, gate_proj) -> `model.layers.L.block_sparse_moe.experts.E.w1.weight`."""
    matched = _EXPERTS.match(prefix)
    assert matched is not None, f"not an experts module: {prefix}"
    return f"{matched.group(1)}.block_sparse_moe.experts.{expert_id}.{EXPERT_PROJECTIONS[projection]}.weight"
