"""What bounds `serving_engine.py`'s throughput on this machine: the cost of one forward, by rows and by tokens.

Continuous and static batching run the same forwards on the same weights: each prompt is prefilled by forwards of
its own, and the decoding rows share one forward [B, 1] per step. They differ only in B: the continuous batch stays
full (up to `--max-batch-size`) while requests wait, a static batch shrinks as its rows finish. So the most that
continuous batching can gain in throughput is the ratio of the decode cost per token at the two batch sizes, and
the most either can reach is the benchmark's tokens divided by the forwards' time. This script measures the forward
costs on the engine's paged cache (one-rank expert parallelism, as `serving_engine.py` runs it), then prints, for
`serving_engine.py`'s workload, both bounds:
- `continuous`: all requests waiting from the start; a row that frees takes the next request (its prefill forward
  gives its first token), the running rows decode one token per step, and the batch drains at the end;
- `static`: the same prefills, and each batch of `--max-batch-size` consecutive requests decoding at the cost of
  the rows still running at each step.
Neither counts the scheduling, the streaming to the callers or the arrivals: the engines can only be slower.

    python benchmarks/serving_bound.py        # k2-debug, fp32, CPU, 1 torch thread, the benchmark's defaults
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from serving_engine import Request, build_model, place_experts_on_one_rank, workload

from k2_workers.model import K2ForCausalLM
from k2_workers.model.paged_cache import PagedPool, PagedView
from k2_workers.serve.request import DEFAULT_PREFILL_CHUNK_TOKENS

BLOCK = 16


def seconds_per_call(run: Callable[[], object], repeats: int, rounds: int = 5) -> float:
    """The fastest round's mean: on a shared machine the other jobs only ever add time."""
    for _ in range(3):
        run()
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


@torch.no_grad()
def decode_costs(model: K2ForCausalLM, pool: PagedPool, past: int, sizes: list[int], repeats: int) -> dict[int, float]:
    """Seconds of one decoding forward of B rows, each with `past` cached tokens."""
    costs = {}
    blocks = math.ceil((past + 1) / BLOCK)
    for rows in sizes:
        tables = [list(range(b * blocks, (b + 1) * blocks)) for b in range(rows)]
        ids_B1 = torch.randint(0, model.config.vocab_size, (rows, 1))
        view = functools.partial(pool.view, tables, [past] * rows, 1)
        costs[rows] = seconds_per_call(functools.partial(_decode, model, ids_B1, view), repeats)
    return costs


def _decode(model: K2ForCausalLM, ids_B1: torch.Tensor, view: Callable[[], PagedView]) -> object:
    return model(ids_B1, cache=view())


@torch.no_grad()
def prefill_cost(model: K2ForCausalLM, pool: PagedPool, tokens: int, repeats: int) -> float:
    """Seconds of one prefill forward of `tokens` new tokens (as the engine runs a chunk: the last position's head)."""
    table = list(range(math.ceil(tokens / BLOCK)))
    ids_1S = torch.randint(0, model.config.vocab_size, (1, tokens))
    return seconds_per_call(
        lambda: model.lm_head(model.model(ids_1S, cache=pool.view([table], [0], tokens))[0, -1]), repeats
    )


def bounds(
    requests: list[Request], batch: int, chunk: int, decode: dict[int, float], prefill: dict[int, float]
) -> dict[str, float]:
    """Tokens/s that continuous and static batching cannot exceed on these forward costs."""

    def prefill_s(request: Request) -> float:
        length = len(request.prompt)
        return (length // chunk) * prefill[chunk] + (prefill[length % chunk] if length % chunk else 0.0)

    tokens = sum(r.max_new_tokens for r in requests)
    # continuous: every request waits from the start (saturation); a free row takes the next one, whose prefill
    # gives its first token, and the rows running decode one token per step, the batch draining at the end
    continuous, waiting, running = 0.0, list(requests), []
    while waiting or running:
        while waiting and len(running) < batch:
            request = waiting.pop(0)
            continuous += prefill_s(request)
            running += [request.max_new_tokens - 1] if request.max_new_tokens > 1 else []
        if running:
            continuous += decode[len(running)]
            running = [left - 1 for left in running if left > 1]
    # static: batches of `batch` consecutive requests, all prefilled, then decoding until the longest is done
    static = sum(prefill_s(r) for r in requests)
    for first in range(0, len(requests), batch):
        outputs = [r.max_new_tokens for r in requests[first : first + batch]]
        for step in range(1, max(outputs)):
            static += decode[sum(out > step for out in outputs)]
    return {"continuous": tokens / continuous, "static": tokens / static}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k2-debug")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[8, 128])
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--past", type=int, default=100, help="cached tokens of each decoding row")
    parser.add_argument("--repeats", type=int, default=10, help="calls per timed round (5 rounds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    try:
        model = build_model(args.preset, "cpu", torch.float32)
        place_experts_on_one_rank(model)
        batch, chunk = args.max_batch_size, DEFAULT_PREFILL_CHUNK_TOKENS
        pool = PagedPool(model.config, batch * math.ceil((args.past + 1) / BLOCK) + chunk // BLOCK + 1, BLOCK)
        decode = decode_costs(model, pool, args.past, list(range(1, batch + 1)), args.repeats)
        lengths = sorted({min(n, chunk) for n in range(1, args.prompt_tokens[1] + 1)} | {chunk})
        prefill = {n: prefill_cost(model, pool, n, max(2, args.repeats // 4)) for n in lengths}
    finally:
        dist.destroy_process_group()
    print(f"{args.preset} fp32 on CPU, 1 thread; decoding rows with {args.past} cached tokens each")
    print(f"{'rows':>5} {'forward ms':>11} {'ms/token':>9} {'x 1 row':>8}")
    for rows, seconds in decode.items():
        print(f"{rows:5d} {1e3 * seconds:11.2f} {1e3 * seconds / rows:9.3f} {seconds / rows / decode[1]:8.2f}")
    print(f"{'prefill tokens':>15} {'forward ms':>11}")
    for tokens in (8, 32, 64, 128):
        if tokens in prefill:
            print(f"{tokens:15d} {1e3 * prefill[tokens]:11.2f}")
    requests = workload(args.requests, 1.0, tuple(args.prompt_tokens), tuple(args.new_tokens), seed=1)
    bound = bounds(requests, batch, chunk, decode, prefill)
    print(
        f"serving_engine.py's workload ({args.requests} requests, batch {batch}): at most "
        f"{bound['continuous']:.0f} tokens/s continuous, {bound['static']:.0f} static: "
        f"continuous/static <= {bound['continuous'] / bound['static']:.2f}"
    )


if __name__ == "__main__":
    main()
