"""`max_attention_logits()` equals a brute-force recomputation of every head's largest pre-softmax logit, with an
independent (complex-number, DeepSeek-style) RoPE; the chunked maximum equals the full masked one."""

from __future__ import annotations

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.model.attention import MLAttention, causal_max_logits
from k2_workers.model.rope import rope_frequencies, softmax_scale


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers; x [..., S, R]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    angles = torch.polar(torch.ones_like(positions[:, None] * inv_freq), positions[:, None] * inv_freq)
    return torch.view_as_real(pairs * angles).flatten(-2)


def _brute_force_max(attn: MLAttention, x_BSD: torch.Tensor, config: K2Config) -> torch.Tensor:
    b, s, _ = x_BSD.shape
    h, n, r = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_BSD))).view(b, s, h, n + r)
    latent, k_rope = attn.kv_a_proj_with_mqa(x_BSD).split([config.kv_lora_rank, r], -1)
    k_nope = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(b, s, h, -1)[..., :n]
    inv_freq, cos_sin_scale = rope_frequencies(config)
    assert cos_sin_scale == 1.0
    positions = torch.arange(s, dtype=torch.float32)
    q_rope = _rope_complex(q[..., n:].transpose(1, 2), positions, inv_freq)  # [B, H, S, R]
    k_rope = _rope_complex(k_rope, positions, inv_freq)  # [B, S, R]
    best = torch.full((h,), float("-inf"))
    for head in range(h):
        for i in range(s):
            for j in range(i + 1):
                logit = (q[:, i, head, :n] * k_nope[:, j, head]).sum(-1) + (q_rope[:, head, i] * k_rope[:, j]).sum(-1)
                best[head] = torch.maximum(best[head], (logit * softmax_scale(config)).max())
    return best


def test_max_attention_logits_equal_brute_force() -> None:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-debug")
    model = K2ForCausalLM(config).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name and not name.endswith("norm.weight"):
                p.normal_(0.0, 0.2)
    inputs: dict[int, torch.Tensor] = {}
    for i, attn in enumerate(model.attention_layers()):
        attn.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    model(input_ids)
    recorded = model.max_attention_logits()
    assert recorded.shape == (config.num_hidden_layers, config.num_attention_heads)
    with torch.no_grad():
        expected = torch.stack(
            [_brute_force_max(attn, inputs[i], config) for i, attn in enumerate(model.attention_layers())]
        )
    torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1.0


def test_not_recorded_in_eval_unless_switched_on() -> None:
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    input_ids = torch.randint(0, 258, (1, 8))
    with torch.no_grad():
        model(input_ids)
        assert torch.count_nonzero(model.max_attention_logits()) == 0
        model.record_attention_logits = True
        model(input_ids)
    assert torch.count_nonzero(model.max_attention_logits()) == model.max_attention_logits().numel()


@pytest.mark.parametrize("chunk_elements", [1, 7, 50, 1 << 20])
@pytest.mark.parametrize("past", [0, 3])
def test_causal_max_logits_in_chunks_equal_the_full_masked_maximum(chunk_elements: int, past: int) -> None:
    g = torch.Generator().manual_seed(past)
    b, h, s, k = 2, 3, 5, 4
    q, keys = torch.randn(b, h, s, k, generator=g), torch.randn(b, h, past + s, k, generator=g)
    keys[:, :, -1], q[:, :, -1] = 100.0, 0.0  # the big key is visible only to the last query, which ignores it
    logits = (q @ keys.transpose(-1, -2)) * 0.5
    visible = torch.ones(s, past + s, dtype=torch.bool).tril(diagonal=past)
    expected = logits.masked_fill(~visible, float("-inf")).amax(dim=(0, 2, 3))
    got = causal_max_logits(q, keys, 0.5, past=past, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, expected)


def test_recording_does_not_change_the_forward() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    input_ids = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        plain = model(input_ids).logits
        model.record_attention_logits = True
        recorded = model(input_ids).logits
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert torch.count_nonzero(model.max_attention_logits()) == model.max_attention_logits().numel()
