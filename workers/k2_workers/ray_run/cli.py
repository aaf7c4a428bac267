"""`k2 run -f FILE.yaml [--address ADDR] [--json]`: run a K2Training or a K2Serving on Ray, locally or on a cluster.

Without --address (or RAY_ADDRESS) a local Ray instance is started for the run, listening on 127.0.0.1 only, and
stopped after it. The manifest is validated by the same API models as admission; errors name the field. A
K2Training runs to its last step (Ctrl-C checkpoints and stops; the same command resumes); a K2Serving serves its
frontend on 127.0.0.1 until Ctrl-C, rebalancing its experts as spec.eplb says and printing a summary line every
spec.eplb.intervalSeconds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from typing import Any

import yaml

from k2_api.contract import ExitCodes
from k2_api.serving import K2Serving
from k2_api.training import K2Training
from k2_workers.ray_run import cluster, manifest
from k2_workers.ray_run.train_plan import DEVICES, STRATEGIES

log = logging.getLogger("k2_workers.ray_run")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 run", description=__doc__)
    parser.add_argument("-f", "--filename", required=True, help="a K2Training or K2Serving manifest (YAML)")
    parser.add_argument("--address", help="an existing Ray cluster (default $RAY_ADDRESS, else a local instance)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON line per step (training) or per summary (serving)"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: GPUs when the spec and Ray have them")
    parser.add_argument("--storage-path", dest="storage_path", help="training: Ray Train storage (~/ray_results)")
    parser.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=1.0, help="per rank; 1")
    parser.add_argument("--placement-strategy", dest="placement_strategy", choices=STRATEGIES, default="PACK")
    parser.add_argument("--num-cpus", dest="num_cpus", type=int, help="CPUs of a local instance (default: the ranks')")
    parser.add_argument("--steps", type=int, help="training: total optimizer steps (overrides spec.steps)")
    parser.add_argument("--host", default=cluster.LOOPBACK, help="serving: the frontend's address (127.0.0.1)")
    parser.add_argument("--port", type=int, help="serving: the frontend's port (default spec.frontend.port)")
    parser.add_argument("--verbose", action="store_true", help="Ray's and the workers' logs on stderr")
    return parser.parse_args(argv)


def num_ranks(resource: K2Training | K2Serving) -> int:
    if isinstance(resource, K2Training):
        return resource.spec.world_size
    return resource.spec.groups * resource.spec.ranks_per_group


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING)
    try:
        document, resource = manifest.load(args.filename)
        cfg: Any = None
        if isinstance(resource, K2Training):
            from k2_workers.train.config import resolve_config

            cfg = resolve_config(document, {"steps": args.steps})
        cpus = args.num_cpus or max(1, math.ceil(num_ranks(resource) * args.cpus_per_worker))
        where = cluster.target(args.address, os.environ, cpus)
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return ExitCodes.INVALID_CONFIG
    cluster.prepare(where)
    out = sys.stdout  # the step records only: Ray prints its error messages on sys.stdout, sent to stderr here
    with contextlib.redirect_stdout(sys.stderr), cluster.connected(where, verbose=args.verbose):
        try:
            if isinstance(resource, K2Training):
                return train(args, resource, cfg, out)
            return serve(args, document, resource, out)
        except ValueError as error:
            print(f"invalid configuration: {error}", file=sys.stderr)
            return ExitCodes.INVALID_CONFIG


def train(args: argparse.Namespace, resource: K2Training, cfg: Any, out: Any) -> int:
    from k2_workers.ray_run.train_plan import plan_training
    from k2_workers.ray_run.training import run_training

    plan = plan_training(
        resource,
        cluster_gpus=cluster.gpus(),
        device=args.device,
        storage_path=args.storage_path,
        cpus_per_worker=args.cpus_per_worker,
        placement_strategy=args.placement_strategy,
    )
    return run_training(cfg, plan, json_lines=args.json, out=out)


def serve(args: argparse.Namespace, document: dict[str, Any], resource: K2Serving, out: Any) -> int:
    from k2_workers.ray_run.serve_plan import plan_serving
    from k2_workers.ray_run.serving import run_serving

    plan = plan_serving(
        resource,
        cluster_gpus=cluster.gpus(),
        device=args.device,
        cpus_per_rank=args.cpus_per_worker,
        placement_strategy=args.placement_strategy,
        host=args.host,
        port=args.port,
    )
    return run_serving(document, plan, out=out, json_lines=args.json)
