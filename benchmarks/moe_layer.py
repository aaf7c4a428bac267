"""MoE layer throughput: our `MoE` block vs transformers' eager `DeepseekV3MoE`, same weights, same input, same process.

Both layers get K2's routing (sigmoid noaux_tc, 384 experts, top-8, one shared expert) at a reduced hidden size so
that a 2-core CPU finishes in minutes; the script checks that both outputs agree, then prints tokens/s of each and
the ratio for 512 / 4096 / 16384 tokens (forward, inference mode; `--backward`: forward + backward, train mode).

With a CUDA GPU (sm90+, bf16) it also measures the grouped GEMM of the routed experts at K2's real expert shape
(hidden 7168, intermediate 2048) and reports TFLOP/s against the GPU's bf16 dense peak.

    python benchmarks/moe_layer.py                      # CPU table (and the GPU section when a GPU is present)
    python benchmarks/moe_layer.py --hidden 512 --tokens 512 4096
    python benchmarks/moe_layer.py --backward --repeats 1 --tokens 512 4096   # training step (slow: transformers)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from k2_workers.model import K2Config
from k2_workers.model.experts import grouped_mm_available, grouped_swiglu
from k2_workers.model.moe import MoE

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
}


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Best seconds of `repeats` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warm_up: bool = True) -> dict[str, float]:
    """Best seconds of each function, calls interleaved so that load from other processes hits all alike."""
    for fn in fns.values() if warm_up else ():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def build_pair(config: K2Config, seed: int = 0) -> tuple[Any, MoE]:
    """transformers' eager DeepseekV3MoE with random weights and a random correction bias, and ours with a copy."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    fields = {k: v for k, v in config.to_hf_config().items() if k not in ("auto_map", "quantization_config")}
    hf_config = DeepseekV3Config(**fields, experts_implementation="eager")
    assert hf_config._experts_implementation == "eager"
    torch.manual_seed(seed)
    theirs = DeepseekV3MoE(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # router logits ~ N(0, 1): every expert gets tokens, as in a trained model
            p.normal_(0.0, config.hidden_size**-0.5)
        theirs.gate.e_score_correction_bias.normal_(0.0, 0.01)
    ours = MoE(config).eval()
    inter = config.moe_intermediate_size
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
        assert ours.gate.e_score_correction_bias is not None
        ours.gate.e_score_correction_bias.copy_(theirs.gate.e_score_correction_bias)
        ours.experts.gate_proj.copy_(theirs.experts.gate_up_proj[:, :inter])
        ours.experts.up_proj.copy_(theirs.experts.gate_up_proj[:, inter:])
        ours.experts.down_proj.copy_(theirs.experts.down_proj)
        assert ours.shared_experts is not None
        ours.shared_experts.load_state_dict(theirs.shared_experts.state_dict())
    return theirs, ours


def _with_implementation(moe: MoE, implementation: str, x: torch.Tensor) -> torch.Tensor:
    moe.experts.implementation = implementation
    return moe(x)


def cpu_table(hidden: int, intermediate: int, token_counts: list[int], repeats: int, dtype: torch.dtype) -> None:
    config = K2Config(hidden_size=hidden, moe_intermediate_size=intermediate, num_hidden_layers=2)
    theirs, ours = build_pair(config)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    print(
        f"MoE layer, CPU {str(dtype).removeprefix('torch.')} forward ({torch.get_num_threads()} threads): "
        f"hidden {hidden}, expert intermediate "
        f"{intermediate}, {config.n_routed_experts} experts top-{config.num_experts_per_tok} + "
        f"{config.n_shared_experts} shared, noaux_tc (n_group {config.n_group}); best of {repeats}, interleaved"
    )
    header = ("tokens", "transformers", "ours", "ratio", "ours padded", "ratio", "max |diff|")
    print("{:>7} {:>13} {:>9} {:>6} {:>12} {:>6} {:>10}".format(*header))
    for num_tokens in token_counts:
        x = torch.randn(1, num_tokens, hidden, generator=torch.Generator().manual_seed(num_tokens)).to(dtype)
        with torch.no_grad():
            reference = theirs(x)
            diff = max(
                (_with_implementation(ours, impl, x) - reference).abs().max().item() for impl in ("loop", "padded")
            )
            best = _interleaved(
                {
                    "theirs": lambda: theirs(x),  # noqa: B023
                    "ours": lambda: _with_implementation(ours, "auto", x),  # noqa: B023
                    "padded": lambda: _with_implementation(ours, "padded", x),  # noqa: B023
                },
                repeats,
            )
        rate = {name: num_tokens / seconds for name, seconds in best.items()}
        print(
            f"{num_tokens:>7} {rate['theirs']:>13,.0f} {rate['ours']:>9,.0f} {rate['ours'] / rate['theirs']:>5.2f}x "
            f"{rate['padded']:>12,.0f} {rate['padded'] / rate['theirs']:>5.2f}x {diff:>10.1e}"
        )
    print("(tokens/s; ours = automatic choice, per-expert matmuls on CPU; ours padded = batched GEMM over [E, C, D])")


def _train_step(moe: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Forward and backward of <moe(x), probe>; returns the input's gradient (parameter gradients are dropped)."""
    x = x.detach().requires_grad_(True)
    (moe(x) * probe).sum().backward()
    moe.zero_grad(set_to_none=True)
    assert x.grad is not None
    return x.grad


def cpu_train_table(hidden: int, intermediate: int, token_counts: list[int], repeats: int, dtype: torch.dtype) -> None:
    """Forward + backward in train mode, both layers; the max |diff| column compares the input gradients."""
    config = K2Config(hidden_size=hidden, moe_intermediate_size=intermediate, num_hidden_layers=2)
    theirs, ours = (m.to(dtype).train() for m in build_pair(config))
    print(
        f"MoE layer, CPU {str(dtype).removeprefix('torch.')} forward+backward, train mode "
        f"({torch.get_num_threads()} threads): hidden {hidden}, expert intermediate {intermediate}, "
        f"{config.n_routed_experts} experts top-{config.num_experts_per_tok}; best of {repeats}, interleaved"
    )
    print("{:>7} {:>13} {:>9} {:>7} {:>10}".format("tokens", "transformers", "ours", "ratio", "max |diff|"))
    for num_tokens in token_counts:
        g = torch.Generator().manual_seed(num_tokens)
        x = torch.randn(1, num_tokens, hidden, generator=g).to(dtype)
        probe = torch.randn(1, num_tokens, hidden, generator=g).to(dtype)
        diff = (_train_step(ours, x, probe) - _train_step(theirs, x, probe)).abs().max().item()  # also the warm-up
        best = _interleaved(
            {"theirs": lambda: _train_step(theirs, x, probe), "ours": lambda: _train_step(ours, x, probe)},  # noqa: B023
            repeats,
            warm_up=False,
        )
        rate = {name: num_tokens / seconds for name, seconds in best.items()}
        print(
            f"{num_tokens:>7} {rate['theirs']:>13,.0f} {rate['ours']:>9,.0f} {rate['ours'] / rate['theirs']:>6.1f}x "
            f"{diff:>10.1e}"
        )
    print("(tokens/s of forward + backward with respect to the input and every parameter)")


def gpu_grouped_gemm(num_tokens: int, num_experts: int, repeats: int, peak_tflops: float | None) -> None:
    """Grouped GEMM TFLOP/s of the routed experts at K2's expert shape, bf16, balanced random routing."""
    hidden, inter, top_k = 7168, 2048, 8
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    gate = torch.randn(num_experts, inter, hidden, device=device, dtype=torch.bfloat16) * 0.02
    up = torch.randn_like(gate)
    down = torch.randn(num_experts, hidden, inter, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(num_tokens * top_k, hidden, device=device, dtype=torch.bfloat16)
    if not grouped_mm_available(x):
        print(f"{name}: torch._grouped_mm in bf16 needs sm90+; skipped")
        return
    ids = torch.randint(0, num_experts, (num_tokens * top_k,), device=device)
    counts = torch.bincount(ids, minlength=num_experts)
    with torch.no_grad():
        seconds = _timed(lambda: grouped_swiglu(x, counts, gate, up, down, align=16), repeats, torch.cuda.synchronize)
    flops = 2 * x.shape[0] * hidden * inter * 3
    tflops = flops / seconds / 1e12
    share = f" = {100 * tflops / peak:.0f}% of the {peak:.0f} TFLOP/s bf16 dense peak" if peak else ""
    print(
        f"{name}: grouped GEMM SwiGLU, {num_tokens} tokens x top-{top_k} over {num_experts} experts "
        f"(hidden {hidden}, intermediate {inter}, bf16): {seconds * 1e3:.2f} ms, {tflops:.0f} TFLOP/s{share}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-tokens", type=int, default=16384)
    parser.add_argument("--gpu-experts", type=int, default=384)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 peak")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument(
        "--backward",
        action="store_true",
        help="time forward+backward in train mode instead of the inference forward (slow: about a minute per "
        "transformers call at 384 experts)",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations of both layers on CPU"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        table = cpu_train_table if args.backward else cpu_table
        table(args.hidden, args.intermediate, args.tokens, args.repeats, dtype)
    if torch.cuda.is_available():
        gpu_grouped_gemm(args.gpu_tokens, args.gpu_experts, args.repeats, args.peak_tflops)
    else:
        print("no CUDA device: grouped-GEMM TFLOP/s not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
