"""`k2 worker serve`: a rank of a K2Serving expert-parallel group, or (with --frontend) the router across groups.

A rank reads the K2Serving manifest the operator mounts (`--config`) and the placement in force (`--placement`, the
`<placement>-active` ConfigMap's file), which it re-reads every `--placement-poll-seconds` and applies live. The group
comes from the torchrun-style env the operator sets: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, plus K2_GROUP,
K2_SERVING_NAME, K2_NAMESPACE and K2_POD_NAME. Rank 0 serves HTTP; every rank serves /healthz and /metrics.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from prometheus_client import CollectorRegistry

from k2_api import K2Serving
from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.serve.endpoints import serve_routes
from k2_workers.serve.engine import DEFAULT_BATCH_WAIT_S, DEFAULT_MAX_BATCH_SIZE, GroupEngine
from k2_workers.serve.expert_weights import CheckpointExpertWeights, ExpertWeights, ResidentExpertWeights
from k2_workers.serve.metrics import ExpertLoadCollector, serve_metrics
from k2_workers.serve.placement import ActivePlacement, read_placement
from k2_workers.serve.report import AppliedGenerationReporter
from k2_workers.serve.routes import GroupRouter, frontend_routes, rank_routes
from k2_workers.tokenizer import load_tokenizer
from k2_workers.train.config import local_path

log = logging.getLogger("k2_workers.serve")

DEFAULT_RANK_PORT = 8001  # the operator's containerPort "http"
DEFAULT_METRICS_PORT = 9400


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 worker serve", description=__doc__)
    parser.add_argument("--config", type=Path, help="the K2Serving manifest (YAML)")
    parser.add_argument("--placement", type=Path, help="the placement in force (JSON); round-robin until it exists")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: the manifest's spec.model.checkpointUri)")
    parser.add_argument("--host", default=os.environ.get("K2_LISTEN_HOST", "0.0.0.0"), help="address to listen on")
    parser.add_argument("--port", type=int, help=f"HTTP port (rank default {DEFAULT_RANK_PORT})")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus port, -1: off")
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
    parser.add_argument("--seed", type=int, default=0, help="weights of a preset without a checkpoint")
    parser.add_argument("--frontend", action="store_true", help="route requests across the groups instead")
    parser.add_argument("--endpoints", help="comma-separated group URLs (default: env K2_GROUP_ENDPOINTS)")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size: must be >= 1, got {args.max_batch_size}")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms: must be >= 0, got {args.batch_wait_ms}")
    return args


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.frontend:
        return run_frontend(args, stop)
    if args.config is None:
        print("k2 worker serve: --config is required (the K2Serving manifest)", file=sys.stderr)
        return 2
    return run_rank(args, stop)


def run_frontend(args: argparse.Namespace, stop: threading.Event) -> int:
    endpoints = (args.endpoints or os.environ.get("K2_GROUP_ENDPOINTS", "")).split(",")
    router = GroupRouter([e for e in endpoints if e.strip()])
    server = serve_routes(frontend_routes(router), args.host, args.port or 8000)
    log.info("frontend on %s:%d routing across %d groups", args.host, server.server_port, len(router.endpoints))
    stop.wait()
    server.shutdown()
    return 0


def build_model(serving: K2Serving, checkpoint: str | None, seed: int) -> tuple[K2ForCausalLM, ExpertWeights]:
    """The model with every non-expert weight, and where expert weights come from when a placement needs them."""
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if checkpoint is not None:
        model = K2ForCausalLM.from_pretrained(checkpoint, experts=[], dtype=dtype)  # experts arrive with a placement
        return model, CheckpointExpertWeights(checkpoint, model, dtype)
    spec = serving.spec.model
    config = (
        K2Config.from_hf_config(spec.config.model_dump()) if spec.config else K2Config.from_preset(str(spec.preset))
    )
    torch.manual_seed(seed)
    model = K2ForCausalLM(config).to(dtype)
    return model, ResidentExpertWeights(model)


def init_group(rank: int, world_size: int) -> None:
    timeout = datetime.timedelta(seconds=float(os.environ.get("K2_COLLECTIVE_TIMEOUT_S", "120")))
    if world_size == 1:  # a one-rank group still runs the all-to-all path, over an in-process store
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)


def run_rank(args: argparse.Namespace, stop: threading.Event) -> int:
    serving = K2Serving.model_validate(yaml.safe_load(args.config.read_text()))
    spec = serving.spec
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", str(spec.ranks_per_group)))
    checkpoint = args.checkpoint or (
        local_path(spec.model.checkpoint_uri, "spec.model.checkpointUri") if spec.model.checkpoint_uri else None
    )
    model, weights = build_model(serving, checkpoint, args.seed)
    config = model.config
    num_layers = len(config.moe_layer_indices)
    slots_per_rank = math.ceil(config.n_routed_experts / world_size) + spec.redundant_slots_per_rank
    init_group(rank, world_size)

    registry = CollectorRegistry()
    group = os.environ.get("K2_GROUP", "0")
    name = serving.metadata.name or os.environ.get("K2_SERVING_NAME", "local")
    collector = ExpertLoadCollector(name, group, rank, num_layers, config.n_routed_experts, slots_per_rank)
    registry.register(collector)
    metrics = serve_metrics(registry, args.metrics_port, args.host) if args.metrics_port >= 0 else None
    reporter = AppliedGenerationReporter.from_env()
    engine = GroupEngine(
        model,
        load_tokenizer(checkpoint),
        weights,
        rank,
        world_size,
        collector,
        reporter.report,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
    )
    server = serve_routes(rank_routes(engine, args.max_new_tokens), args.host, args.port or DEFAULT_RANK_PORT)
    log.info("rank %d/%d of group %s listening on %s:%d", rank, world_size, group, args.host, server.server_port)
    try:
        if rank == 0:
            initial = ActivePlacement.round_robin(num_layers, config.n_routed_experts, world_size, slots_per_rank)
            engine.apply_placement(current_placement(args.placement, engine) or initial)
            while not stop.wait(args.placement_poll_seconds):
                placement = current_placement(args.placement, engine)
                if placement is not None and placement.generation != engine.generation:
                    engine.apply_placement(placement)
            engine.stop()
        else:
            engine.follow()
    finally:
        server.shutdown()
        if metrics is not None:
            metrics.close()
        dist.destroy_process_group()
    return 0


def current_placement(path: Path | None, engine: GroupEngine) -> ActivePlacement | None:
    """The placement file's content, or None when absent or invalid: the one in force stays, and the reason is
    logged once and shown by /v1/placement."""
    if path is None or not path.exists():
        return None
    try:
        placement = read_placement(path)
    except ValueError as error:
        if str(error) != engine.placement_error:
            log.warning("ignoring the placement file: %s", error)
        engine.placement_error = str(error)
        return None
    engine.placement_error = None
    return placement
