"""`K2ForCausalLM`: the Kimi-K2 / DeepSeek-V3 decoder (MLA attention, dense then MoE feed-forward blocks), and the
Mixtral decoder with the same modules but grouped-query attention (`config.attention_type == "gqa"`).

Only the modelling lives here; checkpoints (`checkpoint.load_pretrained`, `save_pretrained`) and decoding
(`generate.generate`, `generate_batch`) are functions that take the model.

Module and parameter names mirror the Hugging Face checkpoint names (see CONTRIBUTING.md), so the state-dict
adapter only stacks and unstacks the routed experts.

Shape legend: B = batch, S = sequence, D = hidden, V = vocabulary, L = layers, H = heads, E = routed experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from k2_workers.model.attention import MLAttention
from k2_workers.model.config import K2Config
from k2_workers.model.experts import RoutedExperts
from k2_workers.model.gqa import GQAttention
from k2_workers.model.kv_cache import ForwardCache
from k2_workers.model.mlp import SwiGLU
from k2_workers.model.moe import MoE
from k2_workers.model.norm import RMSNorm
from k2_workers.model.rope import RotaryEmbedding

Attention = MLAttention | GQAttention


@dataclass
class K2Output:
    logits: Tensor  # [B, S, V]
    loss: Tensor | None = None  # mean next-token cross-entropy, when labels were given


class DecoderLayer(nn.Module):
    def __init__(self, config: K2Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn: Attention = (
            GQAttention(config, layer_idx) if config.attention_type == "gqa" else MLAttention(config, layer_idx)
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MoE | SwiGLU = (
            MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self, x_BSD: Tensor, cos: Tensor, sin: Tensor, cache: ForwardCache | None, record_max_logits: bool
    ) -> Tensor:
        normed_BSD = self.input_layernorm(x_BSD)
        kind = "gqa" if isinstance(self.self_attn, GQAttention) else "mla"
        assert cache is None or cache.attention_type == kind, f"{kind} attention with a {type(cache).__name__}"
        attn_BSD: Tensor = self.self_attn(normed_BSD, cos, sin, cache=cache, record_max_logits=record_max_logits)
        h_BSD = x_BSD + attn_BSD
        ffn_BSD: Tensor = self.mlp(self.post_attention_layernorm(h_BSD))
        return h_BSD + ffn_BSD


class K2Model(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids_BS: Tensor,
        position_ids_BS: Tensor | None = None,
        cache: ForwardCache | None = None,
        record_max_logits: bool = False,
    ) -> Tensor:
        x_BSD = self.embed_tokens(input_ids_BS)
        b, s = input_ids_BS.shape
        if position_ids_BS is None:
            if cache is None:
                position_ids_BS = torch.arange(s, device=input_ids_BS.device).expand(b, s)
            else:
                position_ids_BS = cache.positions(s)
        cos, sin = self.rotary_emb(position_ids_BS, x_BSD.dtype)
        for layer in self.layers:
            x_BSD = layer(x_BSD, cos, sin, cache, record_max_logits)
        if cache is not None:
            cache.advance(s)
        out_BSD: Tensor = self.norm(x_BSD)
        return out_BSD


class K2ForCausalLM(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.model = K2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # None: record the attention max logits in training mode only; True/False forces it.
        self.record_attention_logits: bool | None = None
        self.init_weights()

    # --- forward -------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: ForwardCache | None = None,
    ) -> K2Output:
        """Logits [B, S, V]; with `labels` [B, S] also the mean next-token cross-entropy (labels are shifted here,
        as in transformers: position t predicts labels[t + 1]; -100 is ignored)."""
        record = self.training if self.record_attention_logits is None else self.record_attention_logits
        hidden_BSD = self.model(input_ids, position_ids, cache, record)
        logits_BSV = self.lm_head(hidden_BSD)
        loss = None
        if labels is not None:
            predicted = logits_BSV[:, :-1].float().flatten(0, 1)
            loss = F.cross_entropy(predicted, labels[:, 1:].flatten(), ignore_index=-100)
        return K2Output(logits=logits_BSV, loss=loss)

    def tie_weights(self) -> None:
        """Share the input embedding with the output head when the config ties them (again after `to_empty`,
        which gives each module its own tensor)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # --- training hooks ------------------------------------------------------------------------------------------
    def moe_blocks(self) -> Iterator[MoE]:
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                yield layer.mlp

    def attention_layers(self) -> Iterator[Attention]:
        for layer in self.model.layers:
            attn = layer.self_attn
            assert isinstance(attn, MLAttention | GQAttention)
            yield attn

    def max_attention_logits(self) -> Tensor:
        """[num_layers, num_heads]: the largest pre-softmax logit per head of the last recording forward."""
        return torch.stack([attn.last_max_logits_H for attn in self.attention_layers()])

    def expert_token_counts(self) -> Tensor:
        """[num_moe_layers, n_routed_experts]: (token, slot) assignments per logical expert in the last forward."""
        blocks = list(self.moe_blocks())
        if not blocks:
            return torch.zeros(0, self.config.n_routed_experts, dtype=torch.long)
        return torch.stack([moe.last_tokens_per_expert_E for moe in blocks])

    def dropped_token_counts(self) -> Tensor:
        """[num_moe_layers]: (token, slot) assignments dropped for expert capacity in the last forward."""
        device = self.lm_head.weight.device
        blocks = list(self.moe_blocks())
        if not blocks:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.stack([moe.last_dropped.to(device) for moe in blocks])

    def dropped_token_rate(self) -> float:
        """Fraction of the last forward's routed assignments, over all MoE layers, dropped for capacity."""
        routed = sum(moe.last_assignments for moe in self.moe_blocks())
        return float(self.dropped_token_counts().sum().item()) / routed if routed else 0.0

    def aux_loss(self) -> Tensor:
        """Sum over MoE layers of the Switch balance loss N·Σ f_i·P_i (alpha = 1) of the last training forward."""
        losses = [moe.last_aux_loss for moe in self.moe_blocks() if moe.last_aux_loss is not None]
        if not losses:
            return torch.zeros((), device=self.lm_head.weight.device)
        return torch.stack(losses).sum()

    # --- initialisation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) weights, unit norms, zero router biases (as transformers initialises)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RoutedExperts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    nn.init.normal_(p, mean=0.0, std=std)
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, mean=0.0, std=std)
                if module.gate.e_score_correction_bias is not None:
                    module.gate.e_score_correction_bias.zero_()

    def reset_non_persistent_buffers(self) -> None:
        """Recompute buffers that checkpoints do not hold (after `to_empty` from the meta device)."""
        self.model.rotary_emb.reset_buffers()
        for attn in self.attention_layers():
            attn.last_max_logits_H.zero_()
        for moe in self.moe_blocks():
            moe.last_tokens_per_expert_E.zero_()
            moe.last_dropped.zero_()
            experts = moe.experts
            if isinstance(experts, RoutedExperts) and experts.slot_of_expert is not None:
                table = torch.full_like(experts.slot_of_expert, experts.num_slots)
                for slot, e in reversed(list(enumerate(experts.expert_ids))):
                    table[e] = slot
                experts.slot_of_expert = table
