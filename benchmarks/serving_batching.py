"""Serving throughput with and without request batching, same model, same requests, same process.

A one-rank serving group (the `k2 worker serve` engine, expert-parallel path over an in-process gloo group) gets
`--clients` concurrent callers, each sending `--requests` greedy requests one after another (prompts of 8-64 bytes,
`--new-tokens` each). The script runs it with `max_batch_size` 1 (one request at a time) and then with each
`--batch-sizes` value, checks that every completion is the same in all runs, and prints generated tokens/s, the
mean batch size and the mean request latency, with the ratio against one-at-a-time.

    python benchmarks/serving_batching.py                              # k2-debug, 8 clients x 4 requests
    python benchmarks/serving_batching.py --clients 16 --batch-sizes 4 8 16
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer


@dataclass
class RunResult:
    seconds: float
    tokens: int
    batch_sizes: list[int]
    latencies: list[float]
    completions: dict[tuple[int, int], list[int]]


def build_engine(preset: str, max_batch_size: int, batch_wait_s: float) -> GroupEngine:
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset(preset)).eval()
    weights = ResidentExpertWeights(model)
    engine = GroupEngine(
        model, ByteTokenizer(), weights, rank=0, world_size=1, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s
    )
    num_layers, num_experts = len(list(model.moe_blocks())), model.config.n_routed_experts
    engine.apply_placement(ActivePlacement.round_robin(num_layers, num_experts, 1, num_experts))
    return engine


def prompt(client: int, index: int) -> list[int]:
    length = 8 + (client * 7 + index * 13) % 57
    return ByteTokenizer().encode(("expert placement " * 4)[:length])


def run(engine: GroupEngine, clients: int, requests: int, new_tokens: int) -> RunResult:
    result = RunResult(0.0, 0, [], [], {})
    lock = threading.Lock()
    params = GenerateParams(max_new_tokens=new_tokens)

    def client(c: int) -> None:
        for i in range(requests):
            start = time.perf_counter()
            completion = engine.generate(prompt(c, i), params)
            with lock:
                result.latencies.append(time.perf_counter() - start)
                result.batch_sizes.append(completion.batch_size)
                result.tokens += len(completion.tokens)
                result.completions[(c, i)] = completion.tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k2-debug")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, sent one after another")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="the engine's wait for more requests")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        print(
            f"serving {args.preset}, one rank, {torch.get_num_threads()} CPU threads: {args.clients} clients x "
            f"{args.requests} greedy requests x {args.new_tokens} new tokens, batch wait {args.batch_wait_ms} ms"
        )
        header = ("max batch", "tokens/s", "ratio", "mean batch", "mean latency")
        print("{:>10} {:>10} {:>7} {:>11} {:>13}".format(*header))
        baseline: RunResult | None = None
        for max_batch in [1, *args.batch_sizes]:
            engine = build_engine(args.preset, max_batch, args.batch_wait_ms / 1000)
            run(engine, 1, 1, 2)  # warm-up
            result = run(engine, args.clients, args.requests, args.new_tokens)
            engine.stop()
            baseline = baseline or result
            if result.completions != baseline.completions:
                raise SystemExit(f"max batch {max_batch}: completions differ from one request at a time")
            rate = result.tokens / result.seconds
            ratio = rate / (baseline.tokens / baseline.seconds)
            print(
                f"{max_batch:>10} {rate:>10,.0f} {ratio:>6.2f}x {statistics.mean(result.batch_sizes):>11.2f} "
                f"{statistics.mean(result.latencies) * 1e3:>10,.0f} ms"
            )
        print("(completions identical in every run)")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
