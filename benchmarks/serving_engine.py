"""Serving under Poisson arrivals: the continuously batched engine, static batching, and transformers' `generate`.

The same weights (the tiny `k2-debug` model by default, seed 0) and the same requests go to three servers in this
process, each a queue in front of one decoding thread:
- `continuous`: `GroupEngine` as `k2 worker serve` runs it (one rank, in-process gloo group, paged latent cache,
  iteration-level steps, chunked prefill);
- `static`: the engine's earlier static batching, rebuilt here from the same pieces (the same expert-parallel
  experts over the one-rank group, `BatchScheduler` with its 2 ms batch wait: up to `--max-batch-size` queued
  requests, prompts prefilled one by one and joined, then one forward per step until the batch's last row is done;
  a request arriving meanwhile waits for the next batch);
- `hf`: transformers' `DeepseekV3ForCausalLM` with our weights (its own MoE, no expert parallelism), batched the
  way a user of it would: the same scheduler, each batch left-padded and decoded by one
  `generate(max_new_tokens=the batch's longest)` call.

Requests: `--requests` per rate, arriving as a Poisson process of each `--rates` value (requests/s), prompts of
`--prompt-tokens` and outputs of `--new-tokens` (uniform ranges, greedy, EOS ignored, so every server computes the
same tokens). Per server and rate it prints generated tokens/s (from the first arrival to the last token),
p50/p99 time to first token and p50/p99 time per output token (a request's decode time / its tokens after the first),
the ratios against `static` and `hf`, and how many completions differ from the continuous engine's.
Token times come from each server's own decoding thread: the engines stream, and `generate` is timed by a logits
processor at each of its steps.

    python benchmarks/serving_engine.py                                   # k2-debug, fp32, CPU
    python benchmarks/serving_engine.py --device cuda --dtype bfloat16 --preset <larger> --rates 8 32 128
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.model.decoding import prefill_batch
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import DEFAULT_PREFILL_CHUNK_TOKENS, GenerateParams
from k2_workers.serve.resharding import Resharder, ResidentExpertWeights
from k2_workers.serve.scheduler import BatchScheduler
from k2_workers.tokenizer import ByteTokenizer


class NoEos(ByteTokenizer):
    """Byte tokens without an end: every request decodes all its tokens in every server."""

    eos_id = -1


@dataclass(frozen=True)
class Request:
    arrival_s: float
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Record:
    """What a server did with one request: the time of each of its tokens."""

    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def put(self, token: int) -> None:
        self.tokens.append(token)
        self.times.append(time.perf_counter())


def workload(count: int, rate: float, prompt: tuple[int, int], new: tuple[int, int], seed: int) -> list[Request]:
    rng = random.Random(seed)
    arrival, requests = 0.0, []
    for _ in range(count):
        arrival += rng.expovariate(rate)
        ids = [rng.randrange(256) for _ in range(rng.randint(*prompt))]
        requests.append(Request(arrival, ids, rng.randint(*new)))
    return requests


def build_model(preset: str, device: str, dtype: torch.dtype) -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset(preset)).to(dtype).to(device).eval()


# --- the three servers: each takes a request and its record, and fills the record from its decoding thread -------
Server = Callable[[Request, Record], None]  # blocks until the request is done


def one_rank_placement(model: K2ForCausalLM) -> ActivePlacement:
    """Every expert on the one rank: the placement all three servers decode under."""
    num_layers, num_experts = len(list(model.moe_blocks())), model.config.n_routed_experts
    return ActivePlacement.round_robin(num_layers, num_experts, 1, num_experts)


def place_experts_on_one_rank(model: K2ForCausalLM) -> None:
    """Gives `model` the engine's expert-parallel experts over the one-rank group, without an engine."""
    Resharder(model, ResidentExpertWeights(model), 0, 1, lambda source, nbytes: None).apply(
        None, one_rank_placement(model)
    )


def continuous_server(model: K2ForCausalLM, max_batch_size: int, chunk: int) -> tuple[Server, Callable[[], None]]:
    engine = GroupEngine(
        model,
        NoEos(),
        ResidentExpertWeights(model),
        0,
        1,
        max_batch_size=max_batch_size,
        max_queue=100_000,
        prefill_chunk_tokens=chunk,
    )
    engine.apply_placement(one_rank_placement(model))

    def serve(request: Request, record: Record) -> None:
        for token in engine.stream(request.prompt, GenerateParams(request.max_new_tokens)):
            record.put(token)

    return serve, engine.stop


@dataclass(frozen=True)
class _Job:
    request: Request
    record: Record


def static_server(model: K2ForCausalLM, max_batch_size: int) -> tuple[Server, Callable[[], None]]:
    """Static batching as the engine ran it before continuous batching: the same expert-parallel experts over the
    one-rank group (all-to-all included), without the group's wire."""
    device = model.lm_head.weight.device
    place_experts_on_one_rank(model)

    @torch.no_grad()
    def run_batch(jobs: list[_Job]) -> list[bool]:
        prompts = [torch.tensor(j.request.prompt, device=device) for j in jobs]
        limits = [j.request.max_new_tokens for j in jobs]
        cache, logits_BV = prefill_batch(model, prompts, max(limits), prefill_chunk=512)
        rows = list(range(len(jobs)))
        while True:
            next_B = logits_BV.argmax(-1)
            for row, token in zip(rows, next_B.tolist(), strict=True):
                jobs[row].record.put(token)
            kept = [i for i, row in enumerate(rows) if len(jobs[row].record.tokens) < limits[row]]
            if not kept:
                return [True] * len(jobs)
            if len(kept) < len(rows):
                index = torch.tensor(kept, device=device)
                cache.keep_rows(index)
                next_B, rows = next_B[index], [rows[i] for i in kept]
            logits_BV = model(next_B[:, None], cache=cache).logits[:, -1]

    scheduler: BatchScheduler[_Job, bool] = BatchScheduler(run_batch, max_batch_size, max_queue=100_000)

    def serve(request: Request, record: Record) -> None:
        scheduler.submit(_Job(request, record))

    return serve, scheduler.stop


def hf_model(model: K2ForCausalLM) -> Any:
    """transformers' DeepseekV3ForCausalLM with our model's weights (routed experts fused into `gate_up_proj`, as
    transformers 5 lays them out); its logits equal ours."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in model.config.to_hf_config().items() if k not in ("extra", "auto_map")}
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    ours = model.state_dict()
    state = {}
    for name, tensor in ours.items():
        if name.endswith("experts.gate_proj"):
            state[name.replace("gate_proj", "gate_up_proj")] = torch.cat([tensor, ours[name[:-9] + "up_proj"]], dim=1)
        elif not name.endswith("experts.up_proj"):
            state[name] = tensor
    hf.load_state_dict(state, strict=True)
    weight = model.lm_head.weight
    hf.to(device=weight.device, dtype=weight.dtype).eval()  # type: ignore[call-arg]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_server(model: K2ForCausalLM, max_batch_size: int) -> tuple[Server, Callable[[], None]]:
    """transformers' `generate`, each batch left-padded into one call."""
    from transformers import LogitsProcessor, LogitsProcessorList

    hf = hf_model(model)
    device = model.lm_head.weight.device

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    @torch.no_grad()
    def run_batch(jobs: list[_Job]) -> list[bool]:
        width = max(len(j.request.prompt) for j in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            prompt = job.request.prompt
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        clock = Clock()
        longest = max(j.request.max_new_tokens for j in jobs)
        out = hf.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
        for row, job in enumerate(jobs):
            for step in range(job.request.max_new_tokens):
                job.record.tokens.append(int(out[row, width + step]))
                job.record.times.append(clock.times[step])
        return [True] * len(jobs)

    scheduler: BatchScheduler[_Job, bool] = BatchScheduler(run_batch, max_batch_size, max_queue=100_000)

    def serve(request: Request, record: Record) -> None:
        scheduler.submit(_Job(request, record))

    return serve, scheduler.stop


# --- driving a server and summarising ------------------------------------------------------------------------------
def drive(serve: Server, requests: list[Request]) -> tuple[list[Record], float]:
    """Send each request at its arrival time from its own thread; the records and the start time."""
    records = [Record() for _ in requests]
    start = time.perf_counter()

    def client(index: int) -> None:
        time.sleep(max(0.0, start + requests[index].arrival_s - time.perf_counter()))
        serve(requests[index], records[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(requests: list[Request], records: list[Record], start: float) -> dict[str, float]:
    ttft = [r.times[0] - (start + q.arrival_s) for q, r in zip(requests, records, strict=True)]
    tpot = [(r.times[-1] - r.times[0]) / (len(r.times) - 1) for r in records if len(r.times) > 1]
    tokens = sum(len(r.tokens) for r in records)
    elapsed = max(r.times[-1] for r in records) - (start + requests[0].arrival_s)
    return {
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
        "tpot_p50_ms": 1000 * statistics.median(tpot),
        "tpot_p99_ms": 1000 * percentile(tpot, 0.99),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k2-debug")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[8, 128])
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=DEFAULT_PREFILL_CHUNK_TOKENS, help="continuous")
    parser.add_argument("--servers", nargs="+", default=["continuous", "static", "hf"])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for rate in args.rates:
            requests = workload(args.requests, rate, tuple(args.prompt_tokens), tuple(args.new_tokens), seed=1)
            warm = workload(4, 1000.0, (8, 16), (2, 4), seed=2)
            tokens: dict[str, list[list[int]]] = {}
            for name in args.servers:
                model = build_model(args.preset, args.device, dtype)
                if name == "continuous":
                    serve, stop = continuous_server(model, args.max_batch_size, args.prefill_chunk_tokens)
                elif name == "static":
                    serve, stop = static_server(model, args.max_batch_size)
                else:
                    serve, stop = hf_server(model, args.max_batch_size)
                drive(serve, warm)  # one-time set-up (threads, first kernels) out of the measurement
                records, start = drive(serve, requests)
                stop()
                results.setdefault(str(rate), {})[name] = summary(requests, records, start)
                tokens[name] = [r.tokens for r in records]
            for name in args.servers:
                same = sum(a == b for a, b in zip(tokens[name], tokens[args.servers[0]], strict=True))
                results[str(rate)][name]["same_as_first"] = same / len(requests)
    finally:
        dist.destroy_process_group()
    report(results, args)


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
        return
    print(
        f"{args.preset} {args.dtype} on {args.device}, {args.requests} requests per rate, prompts "
        f"{args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, outputs {args.new_tokens[0]}-{args.new_tokens[1]},"
        f" max batch {args.max_batch_size}"
    )
    columns = ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "same_as_first"]
    print(f"{'rate/s':>7} {'server':>11} " + " ".join(f"{c:>13}" for c in columns) + "  x static  x hf")
    for rate, by_server in results.items():
        for name, row in by_server.items():
            ratios = [
                f"{row['tokens_per_s'] / by_server[base]['tokens_per_s']:8.2f}" if base in by_server else "       -"
                for base in ("static", "hf")
            ]
            cells = " ".join(f"{row[c]:13.3f}" for c in columns)
            print(f"{float(rate):7.1f} {name:>11} {cells} {ratios[0]} {ratios[1]}")


if __name__ == "__main__":
    main()
