"""`k2 run` (Ray Train, a local Ray instance) against `k2 worker train --nproc-per-node 2` (the pods' launcher), in one
run and with the same manifest: time to the first step and steady-state seconds per step, 2 ranks on gloo.

Both print one JSON line per step as it ends; the clock is this process's, reading those lines. Time to first step
is from the launch to the first line (for `k2 run`: Ray's start, the gang's placement group and actors, torch's
import in each, the model). Steady state is the wall time from the line of step `--warmup` to the last line divided
by the steps between (checkpoints included: both write them every `--every` steps), so per-step overhead of Ray
(the report to Ray Train, the driver's channel) shows in it. The baseline of the ratios is the launcher, measured in
the same run. `k2 run`'s driver polls its channel every 0.2 s: a few hundredths of a second of error over the run.

    .venv/bin/python benchmarks/ray_train.py [--steps 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "k2training-debug.yaml"
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "RAY_ADDRESS")


def manifest(directory: Path, steps: int, every: int) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["steps"] = steps
    document["spec"]["checkpointing"]["everyNSteps"] = every
    path = directory / "k2training.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def timed(command: list[str], log: Path) -> list[float]:
    """The times (s after launch) at which each step line arrived."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    arrivals = []
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            json.loads(line)
            arrivals.append(time.monotonic() - started)
        if proc.wait() != 0:
            raise RuntimeError(f"{command[:4]} exited {proc.returncode}: see {log}")
    return arrivals


def summary(name: str, arrivals: list[float], warmup: int) -> dict[str, Any]:
    steady = (arrivals[-1] - arrivals[warmup - 1]) / (len(arrivals) - warmup)
    return {"runner": name, "steps": len(arrivals), "first_step_s": arrivals[0], "step_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps (both runners)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the steady state")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="k2-ray-bench-") as tmp:
        work = Path(tmp)
        path = manifest(work, args.steps, args.every)
        k2 = [sys.executable, "-m", "k2_api.cli"]
        launcher = [*k2, "worker", "train", "--config", str(path), "--nproc-per-node", "2", "--json"]
        launcher += ["--checkpoint-dir", str(work / "launcher")]
        ray_run = [*k2, "run", "-f", str(path), "--json", "--storage-path", str(work / "ray"), "--num-cpus", "2"]
        rows = [
            summary("k2 worker train --nproc-per-node 2", timed(launcher, work / "launcher.log"), args.warmup),
            summary("k2 run (Ray Train)", timed(ray_run, work / "ray.log"), args.warmup),
        ]
    base = rows[0]
    for row in rows:
        row["first_step_ratio"] = row["first_step_s"] / base["first_step_s"]
        row["step_ratio"] = row["step_s"] / base["step_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'runner':<38} {'first step s':>12} {'x':>6} {'s/step':>8} {'x':>6}")
    for row in rows:
        print(
            f"{row['runner']:<38} {row['first_step_s']:>12.1f} {row['first_step_ratio']:>6.2f} "
            f"{row['step_s']:>8.3f} {row['step_ratio']:>6.2f}"
        )


if __name__ == "__main__":
    main()
