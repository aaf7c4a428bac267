"""MuonClip optimizer benchmark: step time against torch.optim.Muon and AdamW, and QK-Clip holding max logits at tau.

Run:  .venv/bin/python benchmarks/optimizer.py [--repeats 7] [--threads 1] [--logit-steps 60 --logit-lr 0.05 --tau 10]

1. Step time. One model per config (the k2-debug preset; k2-debug with 128 small experts, K2's fine-grained MoE
   in miniature; and a wider model with 64 larger experts); every parameter gets a fixed random gradient, then each
   optimizer's ``step()`` is timed (median of ``--repeats``, the optimizers taking turns, after one warm-up):
   - MuonClip: Muon on every hidden matrix (stacked experts included) + AdamW on the rest;
   - torch.optim.Muon(adjust_lr_fn="match_rms_adamw") + torch.optim.AdamW on the same split. torch.optim.Muon takes
     only 2-D parameters, so every stacked [E, rows, cols] expert weight is given to it as E separate 2-D
     parameters (the per-expert ``experts.{e}.*_proj.weight`` layout of the HF checkpoint): the same matrices and the
     same maths, one Newton–Schulz call per matrix;
   - torch.optim.AdamW on every parameter (the cost floor of an element-wise optimizer).
2. Max logits. The k2-debug model is trained on one fixed batch with a large learning rate, once without QK-Clip
   (tau = inf) and once with a small tau; the table gives each step's largest pre-softmax logit (measured in that
   step's forward, i.e. before that step's clip) and the heads the step clipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.optim import MuonClip, split_parameters

LR, WEIGHT_DECAY = 2e-4, 0.1


def debug_config() -> K2Config:
    return K2Config.from_preset("k2-debug")


def expert_heavy_config() -> K2Config:
    """k2-debug with 128 fine-grained experts per MoE layer (experts [32, 64])."""
    return dataclasses.replace(debug_config(), n_routed_experts=128, num_experts_per_tok=8)


def expert_heavy_wide_config() -> K2Config:
    """64 larger experts ([128, 256]) per MoE layer, hidden 256: less per-call overhead for batching to remove."""
    return dataclasses.replace(
        debug_config(),
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=64,
        num_experts_per_tok=8,
    )


def build_model(config: K2Config, seed: int = 0) -> K2ForCausalLM:
    torch.manual_seed(seed)
    return K2ForCausalLM(config)


def set_random_grads(params: list[nn.Parameter], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def torch_muon_baseline(model: nn.Module) -> tuple[torch.optim.Muon, torch.optim.AdamW]:
    """torch.optim.Muon on MuonClip's matrices (stacked experts split into 2-D copies), AdamW on the rest."""
    split = split_parameters(model.named_parameters())
    matrices: list[nn.Parameter] = []
    for _, p in split["muon"]:
        assert p.grad is not None, "set the gradients before building the baseline"
        for weight, grad in zip(p.detach().reshape(-1, *p.shape[-2:]), p.grad.reshape(-1, *p.shape[-2:]), strict=True):
            matrix = nn.Parameter(weight.clone())
            matrix.grad = grad.clone()
            matrices.append(matrix)
    muon = torch.optim.Muon(matrices, lr=LR, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for _, p in split["adamw"]], lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95))
    return muon, adamw


def median_step_times(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each step function; the functions take turns, so load from other processes on a shared
    machine hits all of them alike."""
    for step in steps.values():
        step()  # warm-up: allocates optimizer state
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def count_matrices(model: nn.Module) -> tuple[int, int]:
    """(number of Muon matrices, number of Muon parameters) in ``model``."""
    muon = split_parameters(model.named_parameters())["muon"]
    return sum(math.prod(p.shape[:-2]) for _, p in muon), len(muon)


# --- 1. step time ------------------------------------------------------------------------------------------------
def bench_step_time(label: str, config: K2Config, repeats: int) -> None:
    model = build_model(config)
    set_random_grads(list(model.parameters()))
    num_matrices, num_muon_params = count_matrices(model)
    muon_clip = MuonClip(model, lr=LR, weight_decay=WEIGHT_DECAY)
    logits_LH = torch.zeros(config.num_hidden_layers, config.num_attention_heads)  # below tau: the clip check runs
    torch_muon, torch_adamw = torch_muon_baseline(model)
    adamw_all = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.95))

    times = median_step_times(
        {
            "ours": lambda: muon_clip.step(max_attention_logits=logits_LH),
            "torch_muon": lambda: (torch_muon.step(), torch_adamw.step()),
            "adamw": adamw_all.step,
        },
        repeats,
    )
    t_ours, t_torch_muon, t_adamw = times["ours"], times["torch_muon"], times["adamw"]
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"\n### {label}: {num_params / 1e6:.2f}M params; Muon: {num_muon_params} tensors = {num_matrices} matrices "
        f"(experts {config.n_routed_experts} x [{config.moe_intermediate_size}, {config.hidden_size}] per MoE layer)"
    )
    print("| optimizer | step time (ms) | its time / MuonClip's |")
    print("|---|---:|---:|")
    print(f"| MuonClip (batched Newton–Schulz) + QK-Clip | {t_ours * 1e3:.1f} | 1.00x |")
    print(f"| torch.optim.Muon (per matrix) + AdamW | {t_torch_muon * 1e3:.1f} | {t_torch_muon / t_ours:.2f}x |")
    print(f"| torch.optim.AdamW (all params) | {t_adamw * 1e3:.1f} | {t_adamw / t_ours:.2f}x |")


# --- 2. max logits with and without QK-Clip ----------------------------------------------------------------------
def max_logit_trajectory(config: K2Config, tau: float, lr: float, steps: int, seed: int = 0) -> list[tuple[float, int]]:
    """Per step on one fixed batch: the max pre-softmax logit of the step's forward and the heads clipped after it.

    As in the paper, the clip rescales the just-updated weights by gamma from the forward before the update, so the
    next forward's max logit is tau times whatever growth that update caused (largest at a huge learning rate).
    """
    model = build_model(config, seed)
    model.train()
    optimizer = MuonClip(model, lr=lr, weight_decay=0.0, qk_clip_tau=tau)
    text = (__doc__ or "").encode("utf-8")
    seq_len, batch = 64, 4
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text) - seq_len - 1, (batch,), generator=gen).tolist()
    tokens = torch.tensor([list(text[s : s + seq_len + 1]) for s in starts])
    trajectory = []
    for _ in range(steps):
        logits = model(tokens[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        max_logits_LH = model.max_attention_logits().detach().float()
        optimizer.step(max_attention_logits=max_logits_LH)
        optimizer.zero_grad(set_to_none=True)
        trajectory.append((float(max_logits_LH.max()), optimizer.last_clipped_heads))
    return trajectory


def bench_max_logits(steps: int, lr: float, tau: float) -> None:
    config = debug_config()
    free = max_logit_trajectory(config, math.inf, lr, steps)
    clipped = max_logit_trajectory(config, tau, lr, steps)
    num_heads = config.num_hidden_layers * config.num_attention_heads
    print(f"\n### Max attention logit, k2-debug, lr {lr}, weight decay 0, one fixed batch (4 x 64 bytes)")
    print(f"| step | max logit, no QK-Clip | max logit, QK-Clip tau = {tau:g} | heads clipped (of {num_heads}) |")
    print("|---:|---:|---:|---:|")
    for step, ((s_free, _), (s_clip, n_clip)) in enumerate(zip(free, clipped, strict=True), start=1):
        if step % 5 == 0 or step == 1:
            print(f"| {step} | {s_free:.2f} | {s_clip:.2f} | {n_clip} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--logit-steps", type=int, default=60)
    parser.add_argument("--logit-lr", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    bench_step_time("k2-debug", debug_config(), args.repeats)
    bench_step_time("expert-heavy (k2-debug, 128 experts)", expert_heavy_config(), args.repeats)
    bench_step_time("expert-heavy, wider (hidden 256, 64 experts)", expert_heavy_wide_config(), args.repeats)
    bench_max_logits(args.logit_steps, args.logit_lr, args.tau)


if __name__ == "__main__":
    main()
