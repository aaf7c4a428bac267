"""MuonClip's Muon and AdamW updates against torch.optim.Muon / AdamW, and its state_dict round-trip."""

import copy
import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from k2_workers.optim import MuonClip
from tests.optim.k2_debug import debug_model, set_random_grads

LR, WD, MOMENTUM = 0.02, 0.1, 0.95


class Hidden(nn.Module):
    """Hidden 2-D matrices only (some of the same shape, some tall, some wide) and one stacked expert weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(24, 24, bias=False)
        self.b = nn.Linear(24, 24, bias=False)
        self.tall = nn.Linear(16, 40, bias=False)
        self.wide = nn.Linear(40, 16, bias=False)
        self.experts = nn.Parameter(torch.randn(5, 12, 20))


def test_muon_matches_torch_muon_over_several_steps() -> None:
    torch.manual_seed(0)
    ours = Hidden()
    ref = Hidden()
    ref.load_state_dict(ours.state_dict())
    initial = {n: t.clone() for n, t in ours.state_dict().items()}
    initial.update({n: initial[f"{n}.weight"] for n in ("a", "b", "tall", "wide")})
    # torch.optim.Muon takes only 2-D params: the stacked experts become one 2-D param per expert.
    ref_experts = [nn.Parameter(ref.experts.detach()[e].clone()) for e in range(5)]
    ref_params = [ref.a.weight, ref.b.weight, ref.tall.weight, ref.wide.weight, *ref_experts]
    opt = MuonClip(ours, lr=LR, weight_decay=WD, momentum=MOMENTUM, qk_clip_tau=math.inf)
    ref_opt = torch.optim.Muon(
        ref_params, lr=LR, weight_decay=WD, momentum=MOMENTUM, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    assert [g["name"] for g in opt.param_groups] == ["muon"]
    for step in range(4):
        set_random_grads(ours, seed=step)
        for e, p in enumerate(ref_experts):
            p.grad = ours.experts.grad[e].clone()
        for p_ref, p in zip(
            ref_params[:4], [ours.a.weight, ours.b.weight, ours.tall.weight, ours.wide.weight], strict=True
        ):
            p_ref.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    # Batched bf16 matmuls round differently from torch's per-matrix addmm in rare elements (one bf16 ulp of the
    # orthogonalised update, i.e. ~lr·0.2·sqrt(40)·2⁻⁹ ≈ 5e-5); the updates themselves are ~100x larger.
    atol = 1e-4
    for name in ("a", "b", "tall", "wide"):
        got, want = getattr(ours, name).weight, getattr(ref, name).weight
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        assert (got - initial[name]).abs().mean() > 50 * atol
    torch.testing.assert_close(ours.experts.detach(), torch.stack([p.detach() for p in ref_experts]), rtol=0, atol=atol)
    assert (ours.experts.detach() - initial["experts"]).abs().mean() > 50 * atol


def test_adamw_groups_match_torch_adamw() -> None:
    model = debug_model(seed=1)
    ref = debug_model(seed=2)
    ref.load_state_dict(model.state_dict())
    opt = MuonClip(model, lr=1e-2, weight_decay=WD, qk_clip_tau=math.inf)
    adamw_names = [opt.param_names[p] for p in next(g for g in opt.param_groups if g["name"] == "adamw")["params"]]
    ref_params = dict(ref.named_parameters())
    ref_opt = torch.optim.AdamW(
        [ref_params[n] for n in adamw_names], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD
    )
    params = dict(model.named_parameters())
    for step in range(3):
        set_random_grads(model, seed=10 + step)
        for n in adamw_names:
            ref_params[n].grad = params[n].grad.clone()
        opt.step()
        ref_opt.step()
    for n in adamw_names:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=0)
    assert not torch.equal(params["model.norm.weight"], torch.ones(64))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"} <= set(adamw_names)


def test_router_bias_buffer_is_never_touched() -> None:
    model = debug_model()
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    bias.copy_(torch.arange(8.0))
    opt = MuonClip(model, lr=0.1, weight_decay=0.1)
    set_random_grads(model, seed=3)
    opt.step()
    assert torch.equal(bias, torch.arange(8.0))
    assert all(p is not bias for g in opt.param_groups for p in g["params"])


def test_state_dict_round_trip_gives_the_same_next_step() -> None:
    model = debug_model(seed=2)
    opt = MuonClip(model, lr=1e-2, weight_decay=WD)
    for step in range(2):
        set_random_grads(model, seed=20 + step)
        opt.step()
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares tensors with the live state
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}

    set_random_grads(model, seed=99)
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    restored = debug_model(seed=3)
    restored.load_state_dict(saved_model)
    restored_opt = MuonClip(restored, lr=123.0, weight_decay=0.0)  # hyper-parameters come back from the state dict
    restored_opt.load_state_dict(saved_opt)
    assert restored_opt.param_groups[0]["lr"] == 1e-2
    set_random_grads(restored, seed=99)
    restored_opt.step()
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    # Without the momentum state the step would differ.
    fresh = debug_model(seed=3)
    fresh.load_state_dict(saved_model)
    fresh_opt = MuonClip(fresh, lr=1e-2, weight_decay=WD)
    set_random_grads(fresh, seed=99)
    fresh_opt.step()
    assert not torch.allclose(
        fresh.model.layers[0].self_attn.o_proj.weight, restored.model.layers[0].self_attn.o_proj.weight
    )


def test_chunked_batches_give_the_same_update() -> None:
    torch.manual_seed(3)
    one, chunked = Hidden(), Hidden()
    chunked.load_state_dict(one.state_dict())
    opts = [MuonClip(one, lr=LR, weight_decay=WD), MuonClip(chunked, lr=LR, weight_decay=WD, max_batch_numel=600)]
    for model, opt in zip([one, chunked], opts, strict=True):
        set_random_grads(model, seed=5)
        opt.step()
    for (name, got), want in zip(chunked.named_parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_distributed_checkpoint_state_dict_api_round_trip() -> None:
    """The FQN-keyed optimizer state that torch.distributed.checkpoint saves and loads."""
    model = debug_model(seed=4)
    opt = MuonClip(model, lr=1e-2, weight_decay=WD)
    set_random_grads(model, seed=30)
    opt.step()
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert "model.layers.1.mlp.experts.gate_proj" in saved["state"]
    assert [g["name"] for g in saved["param_groups"]] == ["muon", "adamw"]

    restored = debug_model(seed=5)
    restored.load_state_dict(model.state_dict())
    restored_opt = MuonClip(restored, lr=1.0, weight_decay=0.0)
    set_optimizer_state_dict(restored, restored_opt, saved)
    for m, o in ((model, opt), (restored, restored_opt)):
        set_random_grads(m, seed=31)
        o.step()
    for (name, got), want in zip(restored.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
