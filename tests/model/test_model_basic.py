"""The debug preset builds, runs forward and backward, and exposes the training hooks with the contracted shapes."""

from __future__ import annotations

import torch

from k2_workers.model import K2Config, K2ForCausalLM


def test_debug_preset_forward_backward() -> None:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-debug")
    model = K2ForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 64))
    out = model(input_ids, labels=input_ids)
    assert out.logits.shape == (2, 64, config.vocab_size)
    assert out.loss is not None and torch.isfinite(out.loss)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, config.vocab_size), input_ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)
    (out.loss + 0.01 * model.aux_loss()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[1].mlp.experts.gate_proj.grad.abs().sum() > 0

    num_moe = config.num_hidden_layers - config.first_k_dense_replace
    assert model.max_attention_logits().shape == (config.num_hidden_layers, config.num_attention_heads)
    assert (model.max_attention_logits() != 0).all()
    counts = model.expert_token_counts()
    assert counts.shape == (num_moe, config.n_routed_experts)


def test_module_names_follow_the_checkpoint_contract() -> None:
    model = K2ForCausalLM(K2Config.from_preset("k2-debug"))
    names = dict(model.named_parameters())
    assert names["model.layers.1.mlp.experts.gate_proj"].shape == (8, 32, 64)
    assert names["model.layers.1.mlp.experts.down_proj"].shape == (8, 64, 32)
    assert names["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
    assert names["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].shape == (16 + 8, 64)
    buffers = dict(model.named_buffers())
    assert buffers["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
