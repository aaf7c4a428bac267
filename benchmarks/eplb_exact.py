"""The balance-target mode against the exact minimum number of copies (a MILP through HiGHS), on small cases.

For each case (layers x experts at GPUs x slots) and each of `k2 eplb bench`'s load kinds and a few seeds: our fresh
placement of a load, then the bench's shock (`shocked_load`), then `solve_to_target(epsilon=EPSILON)` from that
placement. Its per-layer goal (our fresh balancedness minus epsilon) is handed to `k2_eplb.exact.min_moves`, which
finds the fewest copies that reach it. The baseline of the ratio column is that exact minimum, measured in the same
run; rows where HiGHS did not prove optimality within its time limit are marked (the ratio is then against the best
placement it found, an upper bound of the minimum). Needs `highspy`.

    .venv/bin/python benchmarks/eplb_exact.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from k2_eplb.bench import LOAD_KINDS, shocked_load, synthetic_load
from k2_eplb.exact import limit_for_goal, min_moves
from k2_eplb.metrics import balancedness
from k2_eplb.solver import solve
from k2_eplb.target import solve_to_target

EPSILON = 0.02
CASES = ((2, 32, 8, 4), (2, 24, 16, 2))  # layers, experts, GPUs, slots per GPU
SEEDS = (0, 1, 2)
TIME_LIMIT_S = 30.0


def run(cases: tuple[tuple[int, int, int, int], ...], seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for num_layers, num_experts, gpus, slots in cases:
        for kind in LOAD_KINDS:
            for seed in seeds:
                rng = np.random.default_rng(seed)
                load = synthetic_load(kind, num_layers, num_experts, rng)
                current = solve(load, gpus, slots)
                shocked = shocked_load(load, rng)
                started = time.process_time()
                ours = solve_to_target(shocked, gpus, slots, current=current, epsilon=EPSILON)
                ours_s = time.process_time() - started
                goal_L = ours.fresh_balancedness_L - EPSILON
                started = time.process_time()
                exact = min_moves(shocked, current, limit_for_goal(shocked, current, goal_L), time_limit_s=TIME_LIMIT_S)
                exact_s = time.process_time() - started
                assert (exact.moves_L >= 0).all(), "the fresh solve reaches the goal, so a placement exists"
                assert (balancedness(shocked, exact.placement) >= goal_L - 1e-6).all()
                rows.append(
                    {
                        "layers": num_layers,
                        "experts": num_experts,
                        "gpus": gpus,
                        "slots_per_gpu": slots,
                        "load": kind,
                        "seed": seed,
                        "ours_moves": ours.moves,
                        "exact_moves": int(exact.moves_L.sum()),
                        "proven_optimal": bool(exact.optimal_L.all()),
                        "fresh_moves": int(ours.fresh_moves_L.sum()),
                        "ours_seconds": ours_s,
                        "exact_seconds": exact_s,
                    }
                )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: copies over all its loads and seeds, ours / exact."""
    out = []
    for case in sorted({(r["layers"], r["experts"], r["gpus"], r["slots_per_gpu"]) for r in rows}):
        mine = [r for r in rows if (r["layers"], r["experts"], r["gpus"], r["slots_per_gpu"]) == case]
        ours, exact = sum(r["ours_moves"] for r in mine), sum(r["exact_moves"] for r in mine)
        out.append(
            {
                "case": "{} x {} at {} x {}".format(*case),
                "ours_moves": ours,
                "exact_moves": exact,
                "ratio": ours / max(exact, 1),
                "proven_optimal": all(r["proven_optimal"] for r in mine),
                "exact_seconds_max": max(r["exact_seconds"] for r in mine),
            }
        )
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Copies to reach our fresh balancedness - {EPSILON} per layer: ours (solve_to_target) vs the exact MILP",
        f"{'case':>20} {'load':>9} {'seed':>4} {'ours':>5} {'exact':>5} {'ratio':>6} {'fresh':>6} {'optimal':>7}"
        f" {'ours s':>7} {'MILP s':>7}",
    ]
    for r in rows:
        case = f"{r['layers']} x {r['experts']} at {r['gpus']} x {r['slots_per_gpu']}"
        lines.append(
            f"{case:>20} {r['load']:>9} {r['seed']:>4} {r['ours_moves']:5d} {r['exact_moves']:5d}"
            f" {r['ours_moves'] / max(r['exact_moves'], 1):6.2f} {r['fresh_moves']:6d} {r['proven_optimal']!s:>7}"
            f" {r['ours_seconds']:7.3f} {r['exact_seconds']:7.2f}"
        )
    lines += ["", f"{'case':>20} {'ours':>6} {'exact':>6} {'ratio':>6} {'optimal':>7} {'MILP s max':>10}"]
    for s in summary(rows):
        lines.append(
            f"{s['case']:>20} {s['ours_moves']:6d} {s['exact_moves']:6d} {s['ratio']:6.3f}"
            f" {s['proven_optimal']!s:>7} {s['exact_seconds_max']:10.2f}"
        )
    return "\n".join(lines)


def quiet_highs_banner() -> None:
    """HiGHS prints a banner on stdout (file descriptor 1) the first time a solver is made: make one with that
    descriptor pointed at /dev/null, so that --json prints JSON only."""
    import highspy

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="the 8-GPU case and one seed only")
    args = parser.parse_args(argv)
    quiet_highs_banner()
    rows = run(CASES[:1] if args.quick else CASES, SEEDS[:1] if args.quick else SEEDS)
    print(json.dumps({"rows": rows, "summary": summary(rows)}, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
