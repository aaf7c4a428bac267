"""A serving rank's process: build the model, join the group, serve HTTP and /metrics, and apply placements.

A rank reads the K2Serving manifest the operator mounts (`--config`) and the placement in force (`--placement`, the
`<placement>-active` ConfigMap's file), which rank 0 re-reads every `--placement-poll-seconds` and applies live.
The group comes from the torchrun-style env the operator sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) plus
K2_GROUP, K2_SERVING_NAME, K2_NAMESPACE and K2_POD_NAME. Rank 0 serves generation; every rank serves /healthz and
/metrics.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from prometheus_client import CollectorRegistry

from k2_api import K2Serving, claims
from k2_api.contract import Env, ExitCodes, Ports, TorchrunEnv
from k2_workers import rendezvous
from k2_workers.model import K2Config, K2ForCausalLM, load_pretrained
from k2_workers.serve.chat import load_chat_template
from k2_workers.serve.device import group_backend, serving_device, serving_dtype
from k2_workers.serve.endpoints import HttpLimits, serve_routes
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.engine_metrics import EngineCollector
from k2_workers.serve.grpc_rank_start import start_rank_grpc
from k2_workers.serve.metrics import ExpertLoadCollector, serve_metrics
from k2_workers.serve.openai_routes import openai_routes
from k2_workers.serve.placement import ActivePlacement, GroupShape, read_placement
from k2_workers.serve.rank_routes import rank_routes
from k2_workers.serve.report import AppliedGenerationReporter
from k2_workers.serve.resharding import CheckpointExpertWeights, ExpertWeights, ResidentExpertWeights
from k2_workers.tokenizer import load_tokenizer

log = logging.getLogger("k2_workers.serve")

DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
HEARTBEATS_PER_TIMEOUT = 4  # an idle rank 0 sends a heartbeat every collective timeout / 4
DRAIN_TIMEOUT_S = 30.0  # how long a stopping rank 0 waits for the answers in flight to be written
DEFAULT_SERVING_NAME = "local"  # outside a cluster, for the metrics' `serving` label
DEFAULT_GROUP = "0"


def build_model(
    serving: K2Serving, checkpoint: str | None, seed: int, device: torch.device
) -> tuple[K2ForCausalLM, ExpertWeights]:
    """The model on `device` with every non-expert weight, and where expert weights come from when a placement
    needs them."""
    dtype = serving_dtype(device)
    if checkpoint is not None:
        model = load_pretrained(checkpoint, experts=[], dtype=dtype).to(device)  # experts arrive with a placement
        return model, CheckpointExpertWeights(checkpoint, model, dtype)
    spec = serving.spec.model
    config = (
        K2Config.from_hf_config(spec.config.model_dump()) if spec.config else K2Config.from_preset(str(spec.preset))
    )
    torch.manual_seed(seed)
    model = K2ForCausalLM(config).to(dtype).to(device)  # initialised on the CPU: the same weights on any device
    return model, ResidentExpertWeights(model)


def collective_timeout_s(env: Mapping[str, str] = os.environ) -> float:
    return float(env.get(Env.COLLECTIVE_TIMEOUT_S, DEFAULT_COLLECTIVE_TIMEOUT_S))


def init_group(rank: int, world_size: int, backend: str, env: Mapping[str, str] = os.environ) -> None:
    """Join the group's default process group over `backend` (env:// rendezvous)."""
    timeout = datetime.timedelta(seconds=collective_timeout_s(env))
    if world_size == 1:  # a one-rank group still runs the all-to-all path, over an in-process store
        store = dist.HashStore()  # type: ignore[attr-defined]
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        rendezvous.listen_on_master(rank, world_size, timeout.total_seconds(), env)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)


def run_rank(args: argparse.Namespace, stop: threading.Event) -> int:
    """Serve as this pod's rank until `stop` is set (rank 0) or rank 0 stops the group (the others). Returns 0,
    or ExitCodes.GROUP_BROKEN when the group lost its lockstep (a rank died or failed): every rank of the group then
    exits, and the operator restarts the group's pods together."""
    serving = K2Serving.model_validate(yaml.safe_load(args.config.read_text()))
    spec = serving.spec
    env = os.environ
    rank = int(env.get(TorchrunEnv.RANK, "0"))
    world_size = int(env.get(TorchrunEnv.WORLD_SIZE, str(spec.ranks_per_group)))
    checkpoint = args.checkpoint or (
        claims.local_path(spec.model.checkpoint_uri, "spec.model.checkpointUri") if spec.model.checkpoint_uri else None
    )
    backend = group_backend(torch.cuda.is_available())
    device = serving_device(backend, int(env.get(TorchrunEnv.LOCAL_RANK, "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, weights = build_model(serving, checkpoint, args.seed, device)
    config = model.config
    num_layers = len(config.moe_layer_indices)
    slots_per_rank = math.ceil(config.n_routed_experts / world_size) + spec.redundant_slots_per_rank
    shape = GroupShape(num_layers, config.n_routed_experts, world_size, slots_per_rank)
    init_group(rank, world_size, backend)

    registry = CollectorRegistry()
    group = env.get(Env.GROUP, DEFAULT_GROUP)
    name = serving.metadata.name or env.get(Env.SERVING_NAME, DEFAULT_SERVING_NAME)
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
        max_prompt_tokens=args.max_prompt_tokens,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s or None,
        shape=shape,
        cache_tokens=args.cache_tokens,
        block_size=args.block_size,
        max_step_tokens=args.max_step_tokens,
    )
    if rank == 0:  # the one that schedules
        registry.register(EngineCollector(engine, name, group))
    limits = HttpLimits(
        socket_timeout_s=args.http_timeout_s, max_connections=args.max_connections, max_requests=args.max_requests
    )
    routes = rank_routes(engine, args.max_new_tokens)
    model_name = args.served_model_name or name
    if rank == 0:
        routes |= openai_routes(engine, args.max_new_tokens, model_name, load_chat_template(checkpoint))
    server = serve_routes(routes, args.host, args.port or Ports.RANK_HTTP, limits)
    log.info("rank %d/%d of group %s listening on %s:%d", rank, world_size, group, args.host, server.server_port)
    grpc = start_rank_grpc(args.host, args.grpc_port, engine, args.max_new_tokens, model_name, group)
    try:
        if rank == 0:
            initial = ActivePlacement.round_robin(num_layers, config.n_routed_experts, world_size, slots_per_rank)
            try:
                lead(engine, args.placement, initial, args.placement_poll_seconds, stop)
            finally:  # stopping or broken: /healthz and new requests 503, the queued requests finish (or fail fast)
                if grpc is not None:
                    grpc.drain()
                engine.stop()  # then the followers are told to stop, unless the group is broken
                server.drain(DRAIN_TIMEOUT_S)  # the answers in flight are written before the process exits
        else:
            engine.follow()
    except Exception:
        if engine.broken is None:
            raise
    finally:
        server.shutdown()
        if grpc is not None:
            grpc.stop(DRAIN_TIMEOUT_S)
        if metrics is not None:
            metrics.close()
        if engine.broken is None:  # a broken group's collectives may hang: the process exits instead
            dist.destroy_process_group()
    if engine.broken is not None:
        log.error("rank %d exits with %d: the group is broken (%s)", rank, ExitCodes.GROUP_BROKEN, engine.broken)
        return ExitCodes.GROUP_BROKEN
    return 0


def lead(
    engine: GroupEngine, path: Path | None, initial: ActivePlacement, poll_s: float, stop: threading.Event
) -> None:
    """Rank 0's loop until `stop` or a broken group: apply each new placement file, send heartbeats while idle."""
    heartbeat_s = collective_timeout_s() / HEARTBEATS_PER_TIMEOUT
    engine.apply_placement(current_placement(path, engine) or initial)
    next_poll = time.monotonic() + poll_s
    while engine.broken is None and not stop.wait(min(heartbeat_s, max(0.0, next_poll - time.monotonic()))):
        engine.heartbeat(heartbeat_s)
        if time.monotonic() < next_poll:
            continue
        next_poll = time.monotonic() + poll_s
        placement = current_placement(path, engine)
        if placement is not None and placement.generation != engine.generation:
            engine.apply_placement(placement)


def current_placement(path: Path | None, engine: GroupEngine) -> ActivePlacement | None:
    """The placement file's content, or None when absent, invalid or not fitting the group: the one in force
    stays, and the reason is logged once and shown by /v1/placement."""
    if path is None or not path.exists():
        return None
    try:
        placement = read_placement(path, engine.shape)
    except ValueError as error:
        if str(error) != engine.placement_error:
            log.warning("ignoring the placement file: %s", error)
        engine.placement_error = str(error)
        return None
    engine.placement_error = None
    return placement
