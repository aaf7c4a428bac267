"""QK-Clip on the real K2 model (k2-debug): with lr = 0 only the clip acts, and it caps each clipped head at tau."""

import math

import pytest
import torch

from k2_workers.model import K2ForCausalLM
from k2_workers.optim import MLAHeadLayout, MuonClip, clip_factors, qk_clip_
from tests.optim.k2_debug import debug_model
from tests.optim.replay import recording_attention_inputs, replaying_attention_inputs

NOPE, ROPE, V, HEADS, LAYERS = 16, 8, 16, 4, 4


def _model_with_large_logits(q_lora_rank: int | None) -> tuple[K2ForCausalLM, torch.Tensor]:
    """k2-debug with its q/k projections scaled up, head h of each layer by a different factor."""
    model = debug_model(q_lora_rank=q_lora_rank)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            q = attn.q_proj if q_lora_rank is None else attn.q_b_proj
            q.weight.mul_(torch.linspace(5.0, 40.0, HEADS).repeat_interleave(NOPE + ROPE).unsqueeze(-1))
            attn.kv_b_proj.weight.mul_(10.0)
    tokens = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _train_forward_backward(model: K2ForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()  # type: ignore[union-attr]
    return model.max_attention_logits().clone()


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_clipped_heads_hit_tau_and_the_rest_is_untouched(q_lora_rank: int | None) -> None:
    model, tokens = _model_with_large_logits(q_lora_rank)
    with recording_attention_inputs(model) as inputs:
        s_before = _train_forward_backward(model, tokens)
    tau = float(s_before.flatten().median())
    should_clip = s_before > tau
    assert 0 < int(should_clip.sum()) < should_clip.numel()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    opt = MuonClip(model, lr=0.0, weight_decay=0.1, qk_clip_tau=tau)
    opt.step(max_attention_logits=s_before)

    assert opt.last_clipped_heads == int(should_clip.sum())
    # Re-run the batch with every attention layer fed its recorded input (see replay.py).
    with torch.no_grad(), replaying_attention_inputs(model, inputs):
        model(tokens[:, :-1])
    s_after = model.max_attention_logits()
    torch.testing.assert_close(s_after[should_clip], torch.full_like(s_after[should_clip], tau), rtol=1e-4, atol=0)
    assert torch.equal(s_after[~should_clip], s_before[~should_clip])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    q_name = "q_proj" if q_lora_rank is None else "q_b_proj"
    clipped_layers = should_clip.any(dim=1).nonzero().flatten().tolist()
    assert changed == {f"model.layers.{i}.self_attn.{n}.weight" for i in clipped_layers for n in (q_name, "kv_b_proj")}
    for i in clipped_layers:  # the value rows of kv_b_proj are untouched bit-for-bit
        kv_b_HRD = model.model.layers[i].self_attn.kv_b_proj.weight.view(HEADS, NOPE + V, -1)
        assert torch.equal(
            kv_b_HRD[:, NOPE:], before[f"model.layers.{i}.self_attn.kv_b_proj.weight"].view_as(kv_b_HRD)[:, NOPE:]
        )


def test_rows_are_scaled_by_sqrt_gamma_and_gamma() -> None:
    model = debug_model()
    attn = model.model.layers[0].self_attn
    q_before = attn.q_b_proj.weight.detach().clone().view(HEADS, NOPE + ROPE, -1)
    k_before = attn.kv_b_proj.weight.detach().clone().view(HEADS, NOPE + V, -1)
    s = torch.ones(LAYERS, HEADS)
    s[0] = torch.tensor([50.0, 400.0, 10.0, 200.0])
    layout = MLAHeadLayout(HEADS, NOPE, ROPE, V)
    assert qk_clip_([m.self_attn for m in model.model.layers], layout, s, tau=100.0) == 2
    gamma = torch.tensor([1.0, 0.25, 1.0, 0.5])
    q = attn.q_b_proj.weight.detach().view(HEADS, NOPE + ROPE, -1)
    k = attn.kv_b_proj.weight.detach().view(HEADS, NOPE + V, -1)
    torch.testing.assert_close(q[:, :NOPE], q_before[:, :NOPE] * gamma.sqrt()[:, None, None])
    torch.testing.assert_close(q[:, NOPE:], q_before[:, NOPE:] * gamma[:, None, None])
    torch.testing.assert_close(k[:, :NOPE], k_before[:, :NOPE] * gamma.sqrt()[:, None, None])
    assert torch.equal(k[:, NOPE:], k_before[:, NOPE:])


def test_clip_factors() -> None:
    s = torch.tensor([[50.0, 200.0, float("nan"), 100.0]])
    assert torch.equal(clip_factors(s, 100.0), torch.tensor([[1.0, 0.5, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="tau"):
        clip_factors(s, 0.0)


def test_inactive_clip_and_bad_shapes() -> None:
    model, tokens = _model_with_large_logits(32)
    s = _train_forward_backward(model, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=math.inf)
    opt.step(max_attention_logits=s)
    assert opt.last_clipped_heads == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="shape"):
        opt.qk_clip(s[:1])
    with pytest.raises(ValueError, match="qk_clip_tau"):
        MuonClip(model, lr=0.0, weight_decay=0.0, qk_clip_tau=0.0)
