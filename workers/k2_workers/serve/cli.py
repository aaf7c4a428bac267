"""`k2 worker serve`: a rank of a K2Serving expert-parallel group, or (with --frontend) the router across groups.

A rank (`k2_workers.serve.rank`) reads the K2Serving manifest (`--config`) and the placement in force
(`--placement`), which it re-reads every `--placement-poll-seconds` and applies live; its group comes from the
torchrun-style env the operator sets. The frontend (`k2_workers.serve.frontend`) routes requests across the groups'
URLs (`--endpoints`, default env K2_GROUP_ENDPOINTS).

This module parses flags and dispatches; it imports no torch, and the frontend path never does: the rank's modules
are imported only when a rank runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.parse
from pathlib import Path

from k2_api.contract import Env, Ports
from k2_workers.serve.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_TOKENS
from k2_workers.serve.frontend import run_frontend
from k2_workers.serve.group_wait import DEFAULT_WAIT_S, GroupWait
from k2_workers.serve.http_routes import HttpLimits
from k2_workers.serve.request import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_PREFILL_CHUNK_TOKENS
from k2_workers.serve.scheduler import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT_S,
)

DEFAULT_HOST = "0.0.0.0"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 worker serve", description=__doc__)
    parser.add_argument("--config", type=Path, help="the K2Serving manifest (YAML)")
    parser.add_argument("--placement", type=Path, help="the placement in force (JSON); round-robin until it exists")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the manifest's spec.model.checkpointUri)")
    parser.add_argument("--host", default=os.environ.get(Env.LISTEN_HOST, DEFAULT_HOST), help="address to listen on")
    parser.add_argument(
        "--port", type=int, help=f"HTTP port (default: rank {Ports.RANK_HTTP}, frontend {Ports.FRONTEND})"
    )
    parser.add_argument("--metrics-port", type=int, default=Ports.METRICS, help="Prometheus port, -1: off")
    parser.add_argument(
        "--grpc-port", type=int, default=Ports.GRPC, help="gRPC port (health, reflection, generation), 0: any, -1: off"
    )
    parser.add_argument("--placement-poll-seconds", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the largest max_new_tokens a request may ask")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="most queued requests decoded together as one batch",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULT_BATCH_WAIT_S * 1000,
        help="how long a batch waits for requests already on their way before it starts",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=DEFAULT_MAX_PROMPT_TOKENS,
        help="the longest prompt a request may send, in tokens (also bounded by the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=DEFAULT_CACHE_TOKENS,
        help="capacity of the paged cache, in tokens (every layer's latents for one token count once)",
    )
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per paged-cache block")
    parser.add_argument(
        "--max-step-tokens",
        type=int,
        help="tokens one engine step computes, decode rows and prefill chunks together (default: "
        "--prefill-chunk-tokens + --max-batch-size)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=DEFAULT_PREFILL_CHUNK_TOKENS,
        help="prompt tokens prefilled per forward: bounds prefill memory",
    )
    parser.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="most requests waiting for a batch; more get 429"
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="a request not answered within this gets 504 (and leaves the queue); 0: no deadline",
    )
    parser.add_argument(
        "--http-timeout-s",
        type=float,
        default=HttpLimits.socket_timeout_s,
        help="most time for an HTTP request's headers, and for its body (408), and idle between requests",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=HttpLimits.max_connections,
        help="HTTP connections open at once, idle ones included; one more gets 503",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=HttpLimits.max_requests,
        help="HTTP requests in flight at once (each on a worker thread); one more gets 503",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights of a preset without a checkpoint")
    parser.add_argument(
        "--served-model-name", help="the model id of the OpenAI API (default: the K2Serving's metadata.name)"
    )
    parser.add_argument("--frontend", action="store_true", help="route requests across the groups instead")
    parser.add_argument("--endpoints", help=f"comma-separated group URLs (default: env {Env.GROUP_ENDPOINTS})")
    parser.add_argument(
        "--group-wait-s",
        type=float,
        default=DEFAULT_WAIT_S,
        help="frontend: how long a request that no group took waits for one before 503 (0: no second round)",
    )
    parser.add_argument(
        "--grpc-endpoints",
        help=f"comma-separated host:port of the groups' gRPC (default: --endpoints' hosts, port {Ports.GRPC})",
    )
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size: must be >= 1, got {args.max_batch_size}")
    if args.request_timeout_s < 0:
        parser.error(f"--request-timeout-s: must be >= 0, got {args.request_timeout_s}")
    if args.http_timeout_s <= 0:
        parser.error(f"--http-timeout-s: must be > 0, got {args.http_timeout_s}")
    flags = ("max_prompt_tokens", "prefill_chunk_tokens", "max_queue", "max_connections", "max_requests", "block_size")
    for flag in flags:
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.cache_tokens < args.block_size:
        parser.error(f"--cache-tokens: must hold at least one block of {args.block_size}, got {args.cache_tokens}")
    if args.max_step_tokens is not None and args.max_step_tokens < 1:
        parser.error(f"--max-step-tokens: must be >= 1, got {args.max_step_tokens}")
    if not args.group_wait_s >= 0:
        parser.error(f"--group-wait-s: must be >= 0, got {args.group_wait_s}")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms: must be >= 0, got {args.batch_wait_ms}")
    return args


def grpc_targets(endpoints: list[str]) -> list[str]:
    """The groups' gRPC host:port from their HTTP URLs: the same host, port `Ports.GRPC`."""
    hosts = [urllib.parse.urlsplit(e.strip()).hostname for e in endpoints if e.strip()]
    return [f"{host}:{Ports.GRPC}" for host in hosts if host]


def http_limits(args: argparse.Namespace) -> HttpLimits:
    return HttpLimits(
        socket_timeout_s=args.http_timeout_s, max_connections=args.max_connections, max_requests=args.max_requests
    )


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.frontend:
        endpoints = (args.endpoints or os.environ.get(Env.GROUP_ENDPOINTS, "")).split(",")
        grpc_endpoints = args.grpc_endpoints.split(",") if args.grpc_endpoints else grpc_targets(endpoints)
        grpc = (args.grpc_port, grpc_endpoints) if args.grpc_port >= 0 else None
        port = args.port or Ports.FRONTEND
        return run_frontend(endpoints, args.host, port, stop, http_limits(args), grpc, GroupWait(args.group_wait_s))
    if args.config is None:
        print("k2 worker serve: --config is required (the K2Serving manifest)", file=sys.stderr)
        return 2
    from k2_workers.serve.rank import run_rank  # torch and the model: only a rank needs them

    return run_rank(args, stop)
