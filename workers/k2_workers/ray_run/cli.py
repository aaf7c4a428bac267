"""`k2 run -f FILE.yaml [--address ADDR] [--json]`: run a K2Training on Ray, locally or on an existing cluster.

Without --address (or RAY_ADDRESS) a local Ray instance is started for the run, listening on 127.0.0.1 only, and
stopped after it. The manifest is validated by the same API models as admission; errors name the field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from k2_api.contract import ExitCodes
from k2_api.training import K2Training
from k2_workers.ray_run import cluster, manifest
from k2_workers.ray_run.train_plan import DEVICES, STRATEGIES

log = logging.getLogger("k2_workers.ray_run")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 run", description=__doc__)
    parser.add_argument("-f", "--filename", required=True, help="a K2Training manifest (YAML)")
    parser.add_argument("--address", help="an existing Ray cluster (default $RAY_ADDRESS, else a local instance)")
    parser.add_argument("--json", action="store_true", help="one JSON line per step, even on a terminal")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: GPUs when the spec and Ray have them")
    parser.add_argument("--storage-path", dest="storage_path", help="Ray Train storage (default ~/ray_results)")
    parser.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float, default=1.0, help="default 1")
    parser.add_argument("--placement-strategy", dest="placement_strategy", choices=STRATEGIES, default="PACK")
    parser.add_argument("--num-cpus", dest="num_cpus", type=int, help="CPUs of a local instance (default: the gang's)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides spec.steps)")
    parser.add_argument("--verbose", action="store_true", help="Ray's and the workers' logs on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO if args.verbose else logging.WARNING)
    try:
        document, resource = manifest.load(args.filename)
        if not isinstance(resource, K2Training):
            raise ValueError(f"{args.filename}: k2 run runs K2Training only so far (got {resource.kind})")
        from k2_workers.train.config import resolve_config

        cfg = resolve_config(document, {"steps": args.steps})
        gang = resource.spec.world_size
        where = cluster.target(args.address, os.environ, args.num_cpus or max(1, round(gang * args.cpus_per_worker)))
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return ExitCodes.INVALID_CONFIG
    cluster.prepare(where)
    from k2_workers.ray_run.train_plan import plan_training
    from k2_workers.ray_run.training import run_training

    with cluster.connected(where, verbose=args.verbose):
        try:
            plan = plan_training(
                resource,
                cluster_gpus=cluster.gpus(),
                device=args.device,
                storage_path=args.storage_path,
                cpus_per_worker=args.cpus_per_worker,
                placement_strategy=args.placement_strategy,
            )
        except ValueError as error:
            print(f"invalid configuration: {error}", file=sys.stderr)
            return ExitCodes.INVALID_CONFIG
        return run_training(cfg, plan, json_lines=args.json)
