"""`python -m k2_workers.train --config FILE` / `k2 worker train`: the entry point of K2Training pods."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from k2_api.contract import Env, ExitCodes, TorchrunEnv
from k2_workers.train.config import RunConfig, load_manifest, resolve_config
from k2_workers.train.export_target import local_export_target
from k2_workers.train.termination import crash_message, write_termination_message

log = logging.getLogger("k2_workers.train")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 worker train", description=__doc__)
    parser.add_argument("--config", help="a K2Training manifest (YAML); without it the defaults of a local demo run")
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides spec)")
    parser.add_argument("--checkpoint-dir", dest="checkpoint_dir", help="checkpoint root (overrides spec)")
    parser.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, help="steps between checkpoints")
    parser.add_argument(
        "--stop-after",
        dest="stop_after",
        type=int,
        help="stop with a checkpoint after this step; the schedule stays sized by --steps (for resume experiments)",
    )
    parser.add_argument("--seed", type=int, help="seed of weights init and data order (overrides spec)")
    parser.add_argument("--grad-clip", dest="grad_clip", type=float, help="global gradient-norm bound; 0 = off")
    parser.add_argument(
        "--aux-loss-alpha", dest="aux_loss_alpha", type=float, help="Switch auxiliary loss weight; 0 (default) = off"
    )
    parser.add_argument(
        "--expert-parallel", dest="expert_parallel", type=int, help="ranks sharing one copy of the experts"
    )
    parser.add_argument(
        "--nproc-per-node",
        dest="nproc_per_node",
        type=int,
        default=1,
        help="ranks to start in this pod/machine (k2_workers.train.launcher); 1 = run this process as one rank",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: cuda when available")
    parser.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help=f"Prometheus port on rank 0; 0 = off (default ${Env.METRICS_PORT} or 0)",
    )
    parser.add_argument(
        "--export-dir",
        dest="export_dir",
        help="write the Hugging Face-format model here when the run reaches --steps (default: <checkpoints>/export "
        "when spec.checkpointing has a uri or claimName)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per step on stdout even on a terminal (pods; without a terminal this is the default)",
    )
    parser.add_argument(
        "--pg-timeout",
        dest="process_group_timeout_s",
        type=float,
        help="seconds a collective may wait for the other ranks before the worker fails (default 60)",
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace, stdout_is_tty: bool = False) -> RunConfig:
    manifest = load_manifest(args.config) if args.config else None
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "nproc_per_node", "json")}
    overrides["progress_bar"] = stdout_is_tty and not args.json
    if args.export_dir is not None:
        target = local_export_target(args.export_dir)
        overrides["export_dir"], overrides["export_uri"] = target.dir, target.uri
    if overrides["metrics_port"] is None and os.environ.get(Env.METRICS_PORT):
        overrides["metrics_port"] = int(os.environ[Env.METRICS_PORT])
    return resolve_config(manifest, overrides, in_cluster="KUBERNETES_SERVICE_HOST" in os.environ)


def without_nproc_flag(argv: list[str]) -> list[str]:
    """The worker's argv for the ranks a launcher starts."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    rank = os.environ.get(TorchrunEnv.RANK, "0")
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = config_from_args(args, stdout_is_tty=sys.stdout.isatty())
    except (OSError, ValueError, yaml.YAMLError) as error:
        log.error("invalid configuration: %s", error)
        write_termination_message(f"invalid configuration: {crash_message(error)}")
        return ExitCodes.INVALID_CONFIG
    if args.nproc_per_node > 1:
        from k2_workers.train.launcher import launch

        return launch(args.nproc_per_node, without_nproc_flag(argv))
    from k2_workers.train.loop import train  # torch and the model load only once the config is valid

    try:
        return train(cfg)
    except Exception as error:
        log.exception("training failed")
        write_termination_message(f"rank {rank} failed: {crash_message(error)}")
        return ExitCodes.CRASHED
