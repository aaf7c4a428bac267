"""The EPLB controller's plan in rounds after a load shock, without and with the node topology.

For K2's shape (60 MoE layers x 384 experts) at 128 GPUs x 4 slots and 256 GPUs x 3 slots, and each of `k2 eplb
bench`'s load kinds: the fresh placement of a load, then the same shock as the bench's shock suite (`shocked_load`),
then the plan the controller makes (`k2_eplb.rounds.plan_rounds`) with a budget per round of 5% of the slots (of all
layers, as `k2 eplb bench` counts them), once without `gpus_per_node` and once with 8 ranks per node. Per plan:
rounds, balancedness before and after, the target (the fresh solve's balancedness minus 0.01), copies over all
rounds, how many of them cross nodes (their expert had no replica on the destination's node before that round:
`k2_eplb.topology.cross_node_copies`), and the CPU seconds of the planning. The baseline of the ratio column is the
plan without topology, measured in the same run.

    .venv/bin/python benchmarks/eplb_topology.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from k2_api.common import Preset
from k2_api.contract import PRESET_SHAPES
from k2_eplb.bench import LOAD_KINDS, shocked_load, synthetic_load
from k2_eplb.rounds import plan_rounds
from k2_eplb.solver import solve
from k2_eplb.topology import cross_node_copies

KIMI_K2 = PRESET_SHAPES[Preset.KIMI_K2]
GPUS_PER_NODE = 8
BUDGET = 0.05
EPSILON = 0.01
MIN_GAIN = 0.005
MAX_ROUNDS = 8


def plan_row(load: np.ndarray, start: np.ndarray, per_node: int | None, budget: int) -> dict[str, Any]:
    began = time.process_time()
    plan = plan_rounds(
        load,
        start,
        budget=budget,
        epsilon=EPSILON,
        min_gain=MIN_GAIN,
        max_rounds=MAX_ROUNDS,
        gpus_per_node=per_node,
    )
    seconds = time.process_time() - began
    previous, copies, crossed = start, 0, 0
    for step in plan.rounds:
        copies += step.moves
        crossed += cross_node_copies(previous, step.placement_LGS, GPUS_PER_NODE)
        previous = step.placement_LGS
    return {
        "gpus_per_node": per_node,
        "rounds": len(plan.rounds),
        "start": round(plan.start_balancedness, 4),
        "final": round(plan.final_balancedness, 4),
        "target": round(plan.target_balancedness, 4),
        "copies": copies,
        "cross_node": crossed,
        "seconds": round(seconds, 2),
    }


def run(num_layers: int, num_experts: int, shapes: list[tuple[int, int]], seed: int) -> list[dict[str, Any]]:
    rows = []
    for gpus, slots in shapes:
        for kind in LOAD_KINDS:
            rng = np.random.default_rng(seed)
            before = synthetic_load(kind, num_layers, num_experts, rng)
            start = solve(before, gpus, slots)
            after = shocked_load(before, rng)
            budget = int(BUDGET * num_layers * gpus * slots)
            for per_node in (None, GPUS_PER_NODE):
                row = plan_row(after, start, per_node, budget)
                rows.append({"gpus": gpus, "slots": slots, "load": kind, "budget": budget, **row})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = "gpus x slots | load      | topology | rounds | balancedness          | copies | cross-node (ratio) | s"
    lines = [header, "-" * len(header)]
    baseline: dict[tuple[int, str], int] = {}
    for row in rows:
        key = (row["gpus"], row["load"])
        if row["gpus_per_node"] is None:
            baseline[key] = row["cross_node"]
        ratio = row["cross_node"] / baseline[key] if baseline.get(key) else float("nan")
        topology = "none" if row["gpus_per_node"] is None else f"{row['gpus_per_node']}/node"
        lines.append(
            f"{row['gpus']:>4} x {row['slots']}     | {row['load']:<9} | {topology:<8} | {row['rounds']:>6} |"
            f" {row['start']:.3f} -> {row['final']:.3f} ({row['target']:.3f}) | {row['copies']:>6} |"
            f" {row['cross_node']:>6} ({ratio:.2f})      | {row['seconds']:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="4 layers x 48 experts on 16 x 4 and 24 x 3")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        rows = run(4, 48, [(16, 4), (24, 3)], args.seed)
    else:
        rows = run(KIMI_K2.num_moe_layers, KIMI_K2.n_routed_experts, [(128, 4), (256, 3)], args.seed)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
