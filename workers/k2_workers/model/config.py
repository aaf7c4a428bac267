"""`K2Config`: the model hyper-parameters, with the field names of the Hugging Face DeepSeek-V3 / Kimi-K2 config.json.

Two attention designs: `mla` (DeepSeek-V3 / K2) and `gqa` (grouped-query attention, as Mixtral). A Mixtral
config.json (`model_type: mixtral`) is translated by `hf_mixtral`, in both directions.

A config is validated when it is built (from a preset, from a config.json or by hand); a bad value raises a
`ValueError` that names the field.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from k2_api.common import Preset
from k2_api.contract import PRESET_SHAPES
from k2_workers.model import hf_mixtral

ROUTER_SCORING_FUNCS = ("sigmoid", "softmax")
# noaux_tc: DeepSeek-V3 / K2 (bias-corrected choice, top-2-sum group score); greedy: plain top-k (Mixtral/Switch);
# group_limited_greedy: DeepSeek-V2 (max group score, no bias).
ROUTER_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ROPE_SCALING_TYPES = ("yarn",)
ATTENTION_TYPES = ("mla", "gqa")

# HF keys that describe the file rather than the model; to_hf_config writes them, from_hf_config ignores them.
_HF_BOOKKEEPING_KEYS = frozenset(
    {"architectures", "transformers_version", "dtype", "qk_head_dim", "head_dim", "output_router_logits"}
)


def _kimi_k2_rope_scaling() -> dict[str, Any]:
    return {
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


# The MoE numbers of every preset are k2_api.contract's, which the operator and the EPLB controller read too.
_KIMI_K2 = PRESET_SHAPES[Preset.KIMI_K2]


@dataclass
class K2Config:
    """Model hyper-parameters; the defaults are Kimi-K2-Instruct's (July 2025)."""

    vocab_size: int = 163840
    hidden_size: int = _KIMI_K2.hidden_size
    intermediate_size: int = 18432
    moe_intermediate_size: int = _KIMI_K2.moe_intermediate_size
    num_hidden_layers: int = _KIMI_K2.num_hidden_layers
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    attention_type: str = "mla"  # "mla", or "gqa": grouped-query attention with RoPE over the whole head
    # GQA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    sliding_window: int | None = None  # each query attends to its last `sliding_window` tokens (itself included)
    # MLA
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = _KIMI_K2.n_routed_experts
    n_shared_experts: int = 1
    num_experts_per_tok: int = _KIMI_K2.num_experts_per_tok
    first_k_dense_replace: int = _KIMI_K2.first_k_dense_replace
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # Switch-style expert capacity: each expert takes at most ceil(capacity_factor · tokens · top-k / experts)
    # assignments of a forward; the overflow (in routing order) is dropped. None: no capacity.
    capacity_factor: float | None = None
    # positions
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=_kimi_k2_rope_scaling)
    rope_interleave: bool = True
    max_position_embeddings: int = 131072
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    use_cache: bool = True
    torch_dtype: str = "bfloat16"
    model_type: str = "kimi_k2"
    # Any other key of the config.json (architectures, auto_map, quantization_config, ...), kept for to_hf_config.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived sizes -------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query and key: nope + rope dims (MLA) or the head dim (GQA)."""
        if self.attention_type == "gqa":
            return self.gqa_head_dim
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        """Dims that RoPE rotates: MLA's decoupled rope dims, or the whole GQA head."""
        return self.gqa_head_dim if self.attention_type == "gqa" else self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has an MoE block (else a dense SwiGLU), as in the DeepSeek-V3 remote code."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # --- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> K2Config:
        """A built-in configuration: `kimi-k2`, `deepseek-v3`, `mixtral-8x7b`, or the tiny `k2-debug` and
        `mixtral-debug` (for CPU tests)."""
        try:
            overrides = _PRESETS[name]
        except KeyError:
            raise ValueError(f"preset: unknown preset {name!r}; known: {sorted(_PRESETS)}") from None
        return cls(**copy.deepcopy(overrides))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> K2Config:
        """Build from a Hugging Face config.json dict (Kimi-K2, DeepSeek-V3, Mixtral, or one written by
        transformers 5.x)."""
        if hf_mixtral.is_mixtral(hf):
            fields, extra = hf_mixtral.fields_from_hf(dict(hf))
            return cls(**fields, extra=extra)
        hf = copy.deepcopy(dict(hf))
        if "rope_parameters" in hf:  # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters
            params = dict(hf.pop("rope_parameters") or {})
            if "rope_theta" in params:
                hf["rope_theta"] = params.pop("rope_theta")
            rope_type = params.get("rope_type", params.get("type", "default"))
            hf["rope_scaling"] = None if rope_type == "default" else params
        if "num_mtp_layers" in hf:
            hf.setdefault("num_nextn_predict_layers", hf.pop("num_mtp_layers"))
        if "dtype" in hf and "torch_dtype" not in hf:
            hf["torch_dtype"] = hf["dtype"]
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in hf.items() if k in known}
        if kwargs.get("attention_type", "mla") == "mla":  # DeepSeek-V3's config.json writes head_dim = rope dims
            kwargs.pop("head_dim", None)
        extra = {k: v for k, v in hf.items() if k not in known and k not in _HF_BOOKKEEPING_KEYS}
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        for name in ("n_group", "topk_group"):
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = 1
        return cls(**kwargs, extra=extra)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict (legacy `rope_theta` + `rope_scaling` form, as the published checkpoints use):
        Mixtral's keys for `model_type: mixtral`, else DeepSeek-V3's plus any non-default field of ours."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.model_type == hf_mixtral.MODEL_TYPE:
            return hf_mixtral.hf_from_fields(fields, self.extra)
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"]}
        out.update(copy.deepcopy(self.extra))
        for name, value in fields.items():
            if name not in _OMITTED_AT_DEFAULT or value != _OMITTED_AT_DEFAULT[name]:
                out[name] = copy.deepcopy(value)
        return out


# Fields DeepSeek-V3's config.json does not have: written only when set, so K2 / DeepSeek files stay as published.
_OMITTED_AT_DEFAULT: dict[str, Any] = {
    "attention_type": "mla",
    "head_dim": None,
    "sliding_window": None,
    "capacity_factor": None,
}


# --- presets -----------------------------------------------------------------------------------------------------
def _moe(preset: Preset) -> dict[str, Any]:
    """The preset's MoE fields, from the contract."""
    return dataclasses.asdict(PRESET_SHAPES[preset])


_PRESETS: dict[str, dict[str, Any]] = {
    Preset.KIMI_K2.value: _moe(Preset.KIMI_K2),
    Preset.DEEPSEEK_V3.value: {
        **_moe(Preset.DEEPSEEK_V3),
        "vocab_size": 129280,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 163840,
        "num_nextn_predict_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "model_type": "deepseek_v3",
    },
    # Tiny but complete: dense first layer, 8 experts top-2 + 1 shared, MLA with both LoRA ranks, YaRN on.
    # vocab 258 = the byte tokenizer (256 bytes + BOS + EOS).
    Preset.K2_DEBUG.value: {
        **_moe(Preset.K2_DEBUG),
        "vocab_size": 258,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "routed_scaling_factor": 2.827,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 2048,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    },
    # Mixtral-8x7B-v0.1's published config.json.
    Preset.MIXTRAL_8X7B.value: {
        **hf_mixtral.FIXED_FIELDS,
        **hf_mixtral.ROUTING_DEFAULTS,
        **_moe(Preset.MIXTRAL_8X7B),
        "intermediate_size": PRESET_SHAPES[Preset.MIXTRAL_8X7B].moe_intermediate_size,
        "vocab_size": 32000,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "aux_loss_alpha": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Tiny Mixtral: GQA (4 query heads, 2 KV heads), 8 experts softmax top-2, no dense layer; byte tokenizer.
    Preset.MIXTRAL_DEBUG.value: {
        **hf_mixtral.FIXED_FIELDS,
        **hf_mixtral.ROUTING_DEFAULTS,
        **_moe(Preset.MIXTRAL_DEBUG),
        "intermediate_size": PRESET_SHAPES[Preset.MIXTRAL_DEBUG].moe_intermediate_size,
        "vocab_size": 258,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "aux_loss_alpha": 0.02,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    },
}

PRESET_NAMES = tuple(_PRESETS)


# --- validation --------------------------------------------------------------------------------------------------
def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _validate(c: K2Config) -> None:
    positive = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "moe_layer_freq",
        "max_position_embeddings",
    )
    for name in positive:
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
        _require(value > 0, name, f"must be > 0, got {value}")
    for name in ("qk_nope_head_dim", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value >= 0, name, f"must be an integer >= 0, got {value!r}")
    _require(c.q_lora_rank is None or c.q_lora_rank > 0, "q_lora_rank", f"must be None or > 0, got {c.q_lora_rank}")
    _require(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even (RoPE pairs), got {c.qk_rope_head_dim}")
    _require(
        c.attention_type in ATTENTION_TYPES,
        "attention_type",
        f"unknown attention {c.attention_type!r}; known: {list(ATTENTION_TYPES)}",
    )
    if c.attention_type == "mla":
        _require(
            c.num_key_value_heads == c.num_attention_heads,
            "num_key_value_heads",
            f"MLA needs num_key_value_heads == num_attention_heads ({c.num_attention_heads}),"
            f" got {c.num_key_value_heads}",
        )
        _require(c.sliding_window is None, "sliding_window", "only GQA attention has a sliding window")
    else:
        _validate_gqa(c)
    if c.model_type == hf_mixtral.MODEL_TYPE:
        for name, value in hf_mixtral.FIXED_FIELDS.items():
            _require(getattr(c, name) == value, name, f"a Mixtral config has {value!r}, got {getattr(c, name)!r}")
    _require(
        c.capacity_factor is None or (isinstance(c.capacity_factor, int | float) and c.capacity_factor > 0),
        "capacity_factor",
        f"must be None or > 0, got {c.capacity_factor!r}",
    )
    _require(
        c.first_k_dense_replace <= c.num_hidden_layers,
        "first_k_dense_replace",
        f"{c.first_k_dense_replace} exceeds num_hidden_layers {c.num_hidden_layers}",
    )
    _require(c.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {c.hidden_act!r}")
    _require(c.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {c.rms_norm_eps}")
    _require(c.rope_theta > 0, "rope_theta", f"must be > 0, got {c.rope_theta}")
    _require(c.routed_scaling_factor > 0, "routed_scaling_factor", f"must be > 0, got {c.routed_scaling_factor}")
    _require(c.aux_loss_alpha >= 0, "aux_loss_alpha", f"must be >= 0, got {c.aux_loss_alpha}")
    _require(
        c.scoring_func in ROUTER_SCORING_FUNCS,
        "scoring_func",
        f"unknown scoring function {c.scoring_func!r}; known: {list(ROUTER_SCORING_FUNCS)}",
    )
    _require(
        c.topk_method in ROUTER_TOPK_METHODS,
        "topk_method",
        f"unknown top-k method {c.topk_method!r}; known: {list(ROUTER_TOPK_METHODS)}",
    )
    _require(
        c.num_experts_per_tok <= c.n_routed_experts,
        "num_experts_per_tok",
        f"{c.num_experts_per_tok} exceeds n_routed_experts {c.n_routed_experts}",
    )
    _require(
        c.n_routed_experts % c.n_group == 0,
        "n_group",
        f"n_routed_experts {c.n_routed_experts} is not divisible by n_group {c.n_group}",
    )
    _require(c.topk_group <= c.n_group, "topk_group", f"{c.topk_group} exceeds n_group {c.n_group}")
    experts_per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1:
        _require(c.topk_method != "greedy", "topk_method", "'greedy' does not use expert groups; set n_group = 1")
        _require(
            c.topk_method != "noaux_tc" or experts_per_group >= 2,
            "n_group",
            f"noaux_tc scores a group by its top-2 experts, so each group needs >= 2 experts, got {experts_per_group}",
        )
    _require(
        c.num_experts_per_tok <= c.topk_group * experts_per_group,
        "num_experts_per_tok",
        f"{c.num_experts_per_tok} exceeds the {c.topk_group * experts_per_group} experts of {c.topk_group} groups",
    )
    _validate_rope_scaling(c.rope_scaling)


def _validate_gqa(c: K2Config) -> None:
    kv_heads = c.num_key_value_heads
    _require(isinstance(kv_heads, int) and kv_heads > 0, "num_key_value_heads", f"must be > 0, got {kv_heads!r}")
    _require(
        c.num_attention_heads % kv_heads == 0,
        "num_key_value_heads",
        f"must divide num_attention_heads {c.num_attention_heads}, got {kv_heads}",
    )
    if c.head_dim is None:
        _require(
            c.hidden_size % c.num_attention_heads == 0,
            "head_dim",
            f"unset, and hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}",
        )
    else:
        _require(c.head_dim > 0, "head_dim", f"must be None or > 0, got {c.head_dim}")
    _require(c.gqa_head_dim % 2 == 0, "head_dim", f"must be even (RoPE pairs), got {c.gqa_head_dim}")
    _require(
        c.sliding_window is None or c.sliding_window > 0,
        "sliding_window",
        f"must be None or > 0, got {c.sliding_window}",
    )


def _validate_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    if rope_scaling is None:
        return
    _require(isinstance(rope_scaling, dict), "rope_scaling", f"must be a dict or None, got {rope_scaling!r}")
    kind = rope_scaling.get("type", rope_scaling.get("rope_type"))
    _require(
        kind in ROPE_SCALING_TYPES, "rope_scaling.type", f"unsupported {kind!r}; known: {list(ROPE_SCALING_TYPES)}"
    )
    factor = rope_scaling.get("factor")
    _require(
        isinstance(factor, int | float) and factor >= 1, "rope_scaling.factor", f"must be a number >= 1, got {factor!r}"
    )
    original = rope_scaling.get("original_max_position_embeddings")
    _require(
        isinstance(original, int) and original > 0,
        "rope_scaling.original_max_position_embeddings",
        f"must be an integer > 0, got {original!r}",
    )
    for key in ("beta_fast", "beta_slow"):
        value = rope_scaling.get(key)
        _require(
            value is None or (isinstance(value, int | float) and value > 0),
            f"rope_scaling.{key}",
            f"must be > 0, got {value!r}",
        )
