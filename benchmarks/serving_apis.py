"""The serving APIs and HTTP servers against each other, same engine, same requests, same process: HTTP
(`/v1/completions`, plain and streamed as server-sent events) on the new stack (uvicorn + our ASGI app,
`k2_workers.serve.endpoints`) and on the old one (the stdlib `ThreadingHTTPServer`, `benchmarks/stdlib_http.py`),
and gRPC (`Generate`, `GenerateStream`), on rank 0 and through the frontend.

A one-rank serving group (the `k2 worker serve` engine over an in-process gloo group, k2-debug with random weights)
serves HTTP (both stacks) and gRPC on loopback; a frontend per stack (HTTP) and a gRPC frontend route to it.
`--clients` concurrent callers each send `--requests` greedy requests one after another (prompts of 8-64 bytes,
`--new-tokens` each) through one path at a time, every path once per round (`--rounds`, interleaved, so that a change
of machine load hits every path alike); `GET /v1/models` (no engine: the servers' own cost) takes
`--overhead-requests` per client instead. For each path the script prints the median requests/s of its rounds,
p50/p99 latency and, for streams, p50/p99 time to the first token over all rounds, with the ratio of requests/s
against its named baseline measured in the same run (an HTTP path of the new stack: the same path on the stdlib
server; a gRPC path: the new stack's HTTP path of the same kind, unary or stream), and checks that every path
returned the same completions.

    python benchmarks/serving_apis.py                          # 8 clients x 4 requests, 32 new tokens
    python benchmarks/serving_apis.py --clients 1 --requests 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
import torch.distributed as dist
from stdlib_http import serve_routes_stdlib  # beside this script (run as benchmarks/serving_apis.py)

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.frontend import GroupRouter, frontend_routes
from k2_workers.serve.grpc_api import GenerationStub
from k2_workers.serve.grpc_frontend import FrontendGeneration
from k2_workers.serve.grpc_rank import RankGeneration
from k2_workers.serve.grpc_server import serve_grpc
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.proto import generation_pb2 as pb
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer

MODEL = "bench"


@dataclass(frozen=True)
class Answer:
    text: str
    seconds: float
    first_token_s: float | None  # streams only


Call = Callable[[str], Answer]  # prompt -> answer


def models_call(port: int) -> Call:
    """`GET /v1/models`: no engine in the way, only the server (the prompt is ignored)."""

    def call(_: str) -> Answer:
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request("GET", "/v1/models")
            response = connection.getresponse()
            assert response.status == 200, response.read()
            return Answer(json.loads(response.read())["data"][0]["id"], time.perf_counter() - start, None)
        finally:
            connection.close()

    return call


def http_call(port: int, new_tokens: int, stream: bool) -> Call:
    def call(prompt: str) -> Answer:
        body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream})
        start = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            if not stream:
                text = json.loads(response.read())["choices"][0]["text"]
                return Answer(text, time.perf_counter() - start, None)
            pieces, first = [], None
            for line in response:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"]:
                    first = first if first is not None else time.perf_counter() - start
                    pieces.append(choices[0]["text"])
            return Answer("".join(pieces), time.perf_counter() - start, first)
        finally:
            connection.close()

    return call


def grpc_call(stub: GenerationStub, new_tokens: int, stream: bool) -> Call:
    def call(prompt: str) -> Answer:
        request = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_new_tokens=new_tokens))
        start = time.perf_counter()
        if not stream:
            return Answer(stub.Generate(request, timeout=600).text, time.perf_counter() - start, None)
        pieces, first = [], None
        for message in stub.GenerateStream(request, timeout=600):
            if message.token_ids and first is None:
                first = time.perf_counter() - start
            pieces.append(message.text)
        return Answer("".join(pieces), time.perf_counter() - start, first)

    return call


def run(call: Call, prompts: list[list[str]]) -> tuple[float, list[Answer]]:
    """(wall seconds, answers in client-major order) of every client sending its prompts one after another."""
    answers: list[list[Answer]] = [[] for _ in prompts]

    def client(index: int) -> None:
        for prompt in prompts[index]:
            answers[index].append(call(prompt))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, [a for per_client in answers for a in per_client]


def latency(ms: float) -> str:
    return f"{ms:,.1f} ms" if ms < 10 else f"{ms:,.0f} ms"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="every path once per round, interleaved")
    parser.add_argument("--overhead-requests", type=int, default=50, help="per client, of GET /v1/models (no engine)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    tokenizer = ByteTokenizer()
    engine = GroupEngine(model, tokenizer, ResidentExpertWeights(model), 0, 1)
    experts = model.config.n_routed_experts
    engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), experts, 1, experts))
    routes = openai_routes(engine, 1024, MODEL, None)
    rank_http = {"uvicorn": serve_routes(routes, "127.0.0.1", 0), "stdlib": serve_routes_stdlib(routes, "127.0.0.1", 0)}
    frontend_http = {
        stack: serve(frontend_routes(GroupRouter([f"http://127.0.0.1:{rank_http[stack].server_port}"])), "127.0.0.1", 0)
        for stack, serve in (("uvicorn", serve_routes), ("stdlib", serve_routes_stdlib))
    }
    rank_grpc = serve_grpc("127.0.0.1", 0, lambda: engine.unready, RankGeneration(engine, 1024, MODEL, "0"))
    proxy = FrontendGeneration([f"127.0.0.1:{rank_grpc.port}"])
    frontend_grpc = serve_grpc("127.0.0.1", 0, lambda: None, proxy)
    channels = {
        target: grpc.insecure_channel(f"127.0.0.1:{s.port}")
        for target, s in (("rank", rank_grpc), ("frontend", frontend_grpc))
    }
    http_ports = {
        (target, stack): servers[stack].server_port
        for target, servers in (("rank", rank_http), ("frontend", frontend_http))
        for stack in ("uvicorn", "stdlib")
    }

    prompts = [
        [("the expert placement " * 4)[: 8 + (7 * c + 13 * r) % 57] for r in range(args.requests)]
        for c in range(args.clients)
    ]
    overhead_prompts = [[""] * args.overhead_requests for _ in range(args.clients)]
    run(http_call(http_ports[("rank", "uvicorn")], args.new_tokens, False), [p[:1] for p in prompts])  # warm-up
    print(
        f"k2-debug, {args.clients} clients x {args.requests} requests, {args.new_tokens} new tokens, "
        f"{args.threads} CPU threads, max batch {engine.scheduler.max_batch_size}, "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )
    # (target, server, API) -> (call, baseline key)
    calls: dict[tuple[str, str, str], Call] = {}
    baselines: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    for target in ("rank", "frontend"):
        stub = GenerationStub(channels[target])
        for stack in ("stdlib", "uvicorn"):
            port = http_ports[(target, stack)]
            calls[(target, stack, "HTTP GET /v1/models")] = models_call(port)
            calls[(target, stack, "HTTP")] = http_call(port, args.new_tokens, False)
            calls[(target, stack, "HTTP SSE stream")] = http_call(port, args.new_tokens, True)
            if stack == "uvicorn":
                for api in ("HTTP GET /v1/models", "HTTP", "HTTP SSE stream"):
                    baselines[(target, stack, api)] = (target, "stdlib", api)
        calls[(target, "grpcio", "gRPC unary")] = grpc_call(stub, args.new_tokens, False)
        calls[(target, "grpcio", "gRPC stream")] = grpc_call(stub, args.new_tokens, True)
        baselines[(target, "grpcio", "gRPC unary")] = (target, "uvicorn", "HTTP")
        baselines[(target, "grpcio", "gRPC stream")] = (target, "uvicorn", "HTTP SSE stream")
    rates: dict[tuple[str, str, str], list[float]] = {key: [] for key in calls}
    answers: dict[tuple[str, str, str], list[Answer]] = {key: [] for key in calls}
    reference: list[str] | None = None
    for _ in range(args.rounds):
        for key, call in calls.items():
            overhead = key[2] == "HTTP GET /v1/models"
            seconds, round_answers = run(call, overhead_prompts if overhead else prompts)
            if not overhead:
                texts = [a.text for a in round_answers]
                reference = reference or texts
                assert texts == reference, f"{key}: completions differ from the first path's"
            rates[key].append(len(round_answers) / seconds)
            answers[key] += round_answers
    print(
        "| target | server | API | requests/s | rounds | ratio | baseline | p50 latency | p99 latency "
        "| p50 first token | p99 first token |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for key, key_answers in answers.items():
        target, server, name = key
        rate = statistics.median(rates[key])
        baseline = baselines.get(key)
        ratio = f"{rate / statistics.median(rates[baseline]):.2f}x" if baseline else "1.00x"
        named = f"{baseline[1]} {baseline[2]}" if baseline else "-"
        latencies = [a.seconds * 1000 for a in key_answers]
        firsts = [a.first_token_s * 1000 for a in key_answers if a.first_token_s is not None]
        first = f"{percentile(firsts, 0.5):,.0f} ms | {percentile(firsts, 0.99):,.0f} ms" if firsts else "- | -"
        print(
            f"| {target} | {server} | {name} | {rate:.2f} | {min(rates[key]):.1f}-{max(rates[key]):.1f}"
            f" | {ratio} | {named} | {latency(statistics.median(latencies))}"
            f" | {latency(percentile(latencies, 0.99))} | {first} |"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for channel in channels.values():
        channel.close()
    proxy.close()
    for server in (frontend_grpc, rank_grpc):
        server.stop(0)
    for http_server in (*frontend_http.values(), *rank_http.values()):
        http_server.shutdown()
    engine.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
