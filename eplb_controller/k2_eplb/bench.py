"""`k2 eplb bench`: the placement solver against the published greedy EPLB, all targets measured in one run.

Cases (K2's shape, 60 MoE layers x 384 experts, at 128 GPUs x 4 slots and 256 GPUs x 3 slots):
- fresh: lognormal(σ=1), Zipf(1) and hot-spot loads, each layer in its own random expert order; from-scratch
  balancedness of ours vs the baseline, and the 8-GPU example of the published write-ups (232 vs 205);
- drift: a random walk of the load (each step multiplies every expert's load by lognormal(0, DRIFT_SIGMA), the change
  of a windowed load between two rebalances); ours solves incrementally from its previous placement with a budget of
  5% of the slots, the baseline solves from scratch each step as it does in SGLang and vLLM;
- curve: balancedness vs budget (0% .. 20% of the slots, and unlimited) after one step of the walk and after a
  shock (lognormal(0, 0.3), the drift of the published measurements);
- locality: that step's 5% solve without and with 8 GPUs per node: how many copies cross nodes;
- shock: each load after lognormal(0, SHOCK_POP_SIGMA) with two experts per layer swapping popularity (one of the
  hottest 10% with one of the colder half), from ours' fresh placement of the load before: the stale placement, the
  baseline's fresh solve, ours fresh (as solved, and with its GPUs aligned to the current placement), ours with a
  15% budget, and the balance-target mode (`solve_to_target`) at each TARGET_EPSILONS (the moves-vs-balance
  frontier), and at SHOCK_GOAL_EPSILON with a deadline of TARGET_DEADLINE_S CPU seconds, and over the mean of the
  layers (`over="mean"`) at SHOCK_GOAL_EPSILON, with one and TARGET_PATHS repair paths. `--shock` runs only this
  suite (the same loads, the other suites' random draws skipped over).
Timings are per call on one core (the process is pinned to one CPU, BLAS threads set to 1): CPU seconds of the
process, which the targets use, and wall-clock seconds, which also count waiting for the CPU on a shared machine.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from k2_api.common import DType, Preset  # noqa: E402
from k2_api.contract import PRESET_SHAPES  # noqa: E402
from k2_eplb.align import align_gpus  # noqa: E402
from k2_eplb.baseline import greedy_rebalance  # noqa: E402
from k2_eplb.metrics import (  # noqa: E402
    FloatArray,
    IntArray,
    balancedness,
    count_cross_node_moves,
    count_moves,
    gpu_loads,
)
from k2_eplb.solver import solve  # noqa: E402
from k2_eplb.target import solve_to_target  # noqa: E402

KIMI_K2 = PRESET_SHAPES[Preset.KIMI_K2]
BYTES_PER_EXPERT = KIMI_K2.expert_bytes(DType.FP8)
EXAMPLE_LOAD = [600, 560, 120, 120, 20, 10, 10, 10]
DRIFT_SIGMA = 0.02
SHOCK_SIGMA = 0.3
BUDGET = 0.05
CURVE_BUDGETS: tuple[float | None, ...] = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20, None)
LOAD_KINDS = ("lognormal", "zipf", "hotspot")
GPUS_PER_NODE = 8
SHOCK_POP_SIGMA = 0.25
SHOCK_BUDGET = 0.15
TARGET_EPSILONS = (0.01, 0.02, 0.03, 0.04)
SHOCK_GOAL_EPSILON = 0.02  # issue 17: within 0.01 of the baseline's fresh solve and 0.02 of ours ...
SHOCK_GOAL_MOVED = 0.15  # ... moving at most 15% of the slots
TARGET_DEADLINE_S = 1.0  # the anytime mode: the target at SHOCK_GOAL_EPSILON with this many CPU seconds
TARGET_PATHS = 3  # the target over the mean at SHOCK_GOAL_EPSILON with this many repair paths per goal


@dataclass(frozen=True)
class Scale:
    num_layers: int
    num_experts: int
    shapes: tuple[tuple[int, int], ...]  # (GPUs, slots per GPU)
    drift_steps: int


FULL = Scale(KIMI_K2.num_moe_layers, KIMI_K2.n_routed_experts, ((128, 4), (256, 3)), drift_steps=6)
QUICK = Scale(4, 48, ((16, 4), (24, 3)), drift_steps=2)


def synthetic_load(kind: str, num_layers: int, num_experts: int, rng: np.random.Generator) -> FloatArray:
    """Tokens per expert [L, E]; every layer has its own random expert order."""
    if kind == "lognormal":
        load: FloatArray = rng.lognormal(0.0, 1.0, size=(num_layers, num_experts))
    elif kind == "zipf":
        ranks = 1.0 / np.arange(1, num_experts + 1)
        load = np.stack([rng.permutation(ranks) for _ in range(num_layers)])
    elif kind == "hotspot":  # a few experts take ~10x the tokens of the rest
        load = rng.lognormal(0.0, 0.5, size=(num_layers, num_experts))
        num_hot = max(1, num_experts // 48)
        for layer in range(num_layers):
            load[layer, rng.choice(num_experts, num_hot, replace=False)] *= 10.0 * num_experts / 48
    else:
        raise ValueError(f"kind: unknown load kind {kind!r}")
    return load * 1000.0


@dataclass(frozen=True)
class Timing:
    cpu: float
    wall: float


def timed(fn: Callable[..., IntArray], *args: Any, **kwargs: Any) -> tuple[IntArray, Timing]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn(*args, **kwargs)
    return result, Timing(time.process_time() - cpu, time.perf_counter() - wall)


def run(scale: Scale, seed: int, *, only_shock: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    shock_rng = np.random.default_rng((seed, 1))  # its own stream: the other cases draw what they drew before
    example = np.array([EXAMPLE_LOAD], dtype=float)
    report: dict[str, Any] = {
        "seed": seed,
        "machine": machine(),
        "example": {
            "ours_max_load": float(gpu_loads(example, solve(example, 8, 2)).max()),
            "baseline_max_load": float(gpu_loads(example, greedy_rebalance(example, 8, 2)).max()),
        },
        "fresh": [],
        "drift": [],
        "curve": [],
        "locality": [],
        "shock": [],
    }
    for gpus, slots in scale.shapes:
        num_slots = scale.num_layers * gpus * slots
        for kind in LOAD_KINDS:
            load = synthetic_load(kind, scale.num_layers, scale.num_experts, rng)
            ours, ours_s = timed(solve, load, gpus, slots)
            if only_shock:  # the draws the drift steps take
                for _ in range(scale.drift_steps):
                    rng.lognormal(0.0, DRIFT_SIGMA, size=load.shape)
            else:
                base, base_s = timed(greedy_rebalance, load, gpus, slots)
                report["fresh"].append(fresh_row(load, ours, base, gpus, slots, kind, ours_s, base_s))
                report["drift"] += drift_rows(load, ours, base, gpus, slots, kind, scale.drift_steps, num_slots, rng)
            report["shock"] += shock_rows(shocked_load(load, shock_rng), ours, gpus, slots, kind)
        load = synthetic_load("lognormal", scale.num_layers, scale.num_experts, rng)
        if only_shock:  # the draws of the curve's step and shock
            rng.lognormal(0.0, DRIFT_SIGMA, size=load.shape)
            rng.lognormal(0.0, SHOCK_SIGMA, size=load.shape)
            continue
        start = solve(load, gpus, slots)
        for label, sigma in (("step", DRIFT_SIGMA), ("shock", SHOCK_SIGMA)):
            drifted = load * rng.lognormal(0.0, sigma, size=load.shape)
            report["curve"] += curve_rows(drifted, start, gpus, slots, label, num_slots)
            if label == "step":
                report["locality"] += locality_rows(drifted, start, gpus, slots, int(BUDGET * num_slots))
    report["targets"] = targets(report)
    return report


def fresh_row(
    load: FloatArray, ours: IntArray, base: IntArray, gpus: int, slots: int, kind: str, ours_s: Timing, base_s: Timing
) -> dict[str, Any]:
    b_ours, b_base = balancedness(load, ours), balancedness(load, base)
    return {
        "gpus": gpus,
        "slots_per_gpu": slots,
        "load": kind,
        "ours": float(b_ours.mean()),
        "baseline": float(b_base.mean()),
        "ours_min_layer": float(b_ours.min()),
        "baseline_min_layer": float(b_base.min()),
        "ours_seconds": ours_s.cpu,
        "baseline_seconds": base_s.cpu,
        "ours_wall_seconds": ours_s.wall,
        "baseline_wall_seconds": base_s.wall,
    }


def drift_rows(
    load: FloatArray,
    ours: IntArray,
    base: IntArray,
    gpus: int,
    slots: int,
    kind: str,
    steps: int,
    num_slots: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    rows = []
    budget = int(BUDGET * num_slots)
    for step in range(1, steps + 1):
        load = load * rng.lognormal(0.0, DRIFT_SIGMA, size=load.shape)
        new_ours, ours_s = timed(solve, load, gpus, slots, current=ours, max_moves=budget)
        new_base, base_s = timed(greedy_rebalance, load, gpus, slots)
        moves_ours, moves_base = count_moves(ours, new_ours), count_moves(base, new_base)
        rows.append(
            {
                "gpus": gpus,
                "slots_per_gpu": slots,
                "load": kind,
                "step": step,
                "budget": budget,
                "stale": float(balancedness(load, ours).mean()),
                "ours": float(balancedness(load, new_ours).mean()),
                "baseline": float(balancedness(load, new_base).mean()),
                "ours_moves": moves_ours,
                "baseline_moves": moves_base,
                "ours_moved_fraction": moves_ours / num_slots,
                "baseline_moved_fraction": moves_base / num_slots,
                "ours_bytes": moves_ours * BYTES_PER_EXPERT,
                "baseline_bytes": moves_base * BYTES_PER_EXPERT,
                "ours_seconds": ours_s.cpu,
                "baseline_seconds": base_s.cpu,
                "ours_wall_seconds": ours_s.wall,
                "baseline_wall_seconds": base_s.wall,
            }
        )
        ours, base = new_ours, new_base
    return rows


def curve_rows(
    load: FloatArray, start: IntArray, gpus: int, slots: int, label: str, num_slots: int
) -> list[dict[str, Any]]:
    rows = []
    for fraction in CURVE_BUDGETS:
        budget = None if fraction is None else int(fraction * num_slots)
        placed, seconds = timed(solve, load, gpus, slots, current=start, max_moves=budget)
        moves = count_moves(start, placed)
        rows.append(
            {
                "gpus": gpus,
                "slots_per_gpu": slots,
                "drift": label,
                "budget_fraction": fraction,
                "moves": moves,
                "moved_fraction": moves / num_slots,
                "bytes": moves * BYTES_PER_EXPERT,
                "balancedness": float(balancedness(load, placed).mean()),
                "seconds": seconds.cpu,
                "wall_seconds": seconds.wall,
            }
        )
    fresh = greedy_rebalance(load, gpus, slots)
    for row in rows:
        row["baseline_fresh"] = float(balancedness(load, fresh).mean())
    return rows


def locality_rows(load: FloatArray, start: IntArray, gpus: int, slots: int, budget: int) -> list[dict[str, Any]]:
    """The same incremental solve without and with `gpus_per_node`: copies whose expert had no replica on the
    destination's node must cross the inter-node network."""
    rows = []
    for per_node in (None, GPUS_PER_NODE):
        placed, seconds = timed(solve, load, gpus, slots, current=start, max_moves=budget, gpus_per_node=per_node)
        rows.append(
            {
                "gpus": gpus,
                "slots_per_gpu": slots,
                "gpus_per_node": per_node,
                "budget": budget,
                "moves": count_moves(start, placed),
                "cross_node_moves": count_cross_node_moves(start, placed, GPUS_PER_NODE),
                "balancedness": float(balancedness(load, placed).mean()),
                "seconds": seconds.cpu,
            }
        )
    return rows


def shocked_load(load: FloatArray, rng: np.random.Generator) -> FloatArray:
    """`load` x lognormal(0, SHOCK_POP_SIGMA), then in each layer one of the hottest 10% of the experts and one of
    the colder half swap their loads."""
    shocked: FloatArray = load * rng.lognormal(0.0, SHOCK_POP_SIGMA, size=load.shape)
    num_experts = load.shape[1]
    for layer in range(load.shape[0]):
        order = np.argsort(-shocked[layer], kind="stable")
        hot = rng.choice(order[: max(1, num_experts // 10)])
        cold = rng.choice(order[num_experts // 2 :])
        shocked[layer, [hot, cold]] = shocked[layer, [cold, hot]]
    return shocked


def shock_rows(load: FloatArray, start: IntArray, gpus: int, slots: int, kind: str) -> list[dict[str, Any]]:
    """Every method on the shocked `load`, from `start`; moves counted against `start`."""
    num_slots = start.size
    num_experts = load.shape[1]
    budget = int(SHOCK_BUDGET * num_slots)

    def to_target(
        epsilon: float, deadline_s: float | None = None, over: str = "layer", paths: int = 1
    ) -> Callable[[], IntArray]:
        return lambda: (
            solve_to_target(
                load, gpus, slots, current=start, epsilon=epsilon, deadline_s=deadline_s, over=over, paths=paths
            ).placement
        )

    methods: list[tuple[str, Callable[[], IntArray]]] = [
        ("stale", lambda: start),
        ("baseline fresh", lambda: greedy_rebalance(load, gpus, slots)),
        ("ours fresh", lambda: solve(load, gpus, slots)),
        ("ours fresh aligned", lambda: align_gpus(start, solve(load, gpus, slots), num_experts)),
        (f"ours {SHOCK_BUDGET:.0%} budget", lambda: solve(load, gpus, slots, current=start, max_moves=budget)),
    ]
    methods += [(f"ours target {epsilon}", to_target(epsilon)) for epsilon in TARGET_EPSILONS]
    methods.append(
        (f"ours target {SHOCK_GOAL_EPSILON} {TARGET_DEADLINE_S:g} s", to_target(SHOCK_GOAL_EPSILON, TARGET_DEADLINE_S))
    )
    methods.append((f"ours target mean {SHOCK_GOAL_EPSILON}", to_target(SHOCK_GOAL_EPSILON, over="mean")))
    methods.append(
        (
            f"ours target mean {TARGET_PATHS} paths {SHOCK_GOAL_EPSILON}",
            to_target(SHOCK_GOAL_EPSILON, over="mean", paths=TARGET_PATHS),
        )
    )
    rows = []
    for name, method in methods:
        placed, seconds = timed(method)
        moves = count_moves(start, placed)
        scores = balancedness(load, placed)
        rows.append(
            {
                "gpus": gpus,
                "slots_per_gpu": slots,
                "load": kind,
                "method": name,
                "balancedness": float(scores.mean()),
                "min_layer": float(scores.min()),
                "moves": moves,
                "moved_fraction": moves / num_slots,
                "bytes": moves * BYTES_PER_EXPERT,
                "seconds": seconds.cpu,
                "wall_seconds": seconds.wall,
            }
        )
    return rows


def targets(report: dict[str, Any]) -> dict[str, bool]:
    shock = {(row["gpus"], row["load"], row["method"]): row for row in report["shock"]}
    target_rows = [(key, row) for key, row in shock.items() if key[2].startswith("ours target") and key[2][-1] != "s"]
    result: dict[str, bool] = {}
    goals = (
        ("shock_goal", "ours target"),
        ("shock_goal_mean", "ours target mean"),
        (f"shock_goal_mean_{TARGET_PATHS}_paths", f"ours target mean {TARGET_PATHS} paths"),
    )
    for prefix, method in goals:
        goal = [(key, row) for key, row in shock.items() if key[2] == f"{method} {SHOCK_GOAL_EPSILON}"]
        result[f"{prefix}_balance_within_0.01_of_baseline_and_0.02_of_ours_fresh"] = all(
            row["balancedness"] >= shock[(gpus, kind, "baseline fresh")]["balancedness"] - 0.01 - 1e-12
            and row["balancedness"] >= shock[(gpus, kind, "ours fresh")]["balancedness"] - SHOCK_GOAL_EPSILON - 1e-12
            for (gpus, kind, _), row in goal
        )
        result[f"{prefix}_at_most_15_percent_moved"] = all(row["moved_fraction"] <= SHOCK_GOAL_MOVED for _, row in goal)
    result |= {
        "shock_target_within_epsilon_of_ours_fresh": all(
            row["balancedness"] >= shock[(gpus, kind, "ours fresh")]["balancedness"] - float(name.split()[-1]) - 1e-12
            for (gpus, kind, name), row in target_rows
        ),
        "shock_target_moves_below_ours_fresh": all(
            row["moves"] <= shock[(gpus, kind, "ours fresh aligned")]["moves"] for (gpus, kind, _), row in target_rows
        ),
    }
    fresh, drift = report["fresh"], report["drift"]
    if not fresh:  # --shock
        return result
    seconds = [row["ours_seconds"] for row in fresh + drift]
    seconds += [row["seconds"] for row in report["curve"] + report["locality"]]
    return result | {
        "fresh_at_least_baseline_every_case": all(row["ours"] >= row["baseline"] for row in fresh),
        "example_max_load_at_most_205": report["example"]["ours_max_load"] <= 205.0,
        "example_baseline_232": abs(report["example"]["baseline_max_load"] - 232.0) < 1e-9,
        "drift_within_0.01_of_baseline_fresh": all(row["ours"] >= row["baseline"] - 0.01 for row in drift),
        "drift_within_budget": all(row["ours_moves"] <= row["budget"] for row in drift)
        and all(row["moves"] <= row["budget"] for row in report["locality"]),
        "baseline_moves_over_90_percent": all(row["baseline_moved_fraction"] > 0.9 for row in drift),
        "solve_under_0.5_cpu_seconds": max(seconds) < 0.5,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__, "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpus_used"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return info


def pin_to_one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"8-GPU example, max GPU load: ours {report['example']['ours_max_load']:.0f}, "
        f"baseline {report['example']['baseline_max_load']:.0f}",
        "",
        "From scratch: balancedness (mean over layers; min layer), solve CPU seconds (wall in parentheses)",
        f"{'GPUs x slots':>12} {'load':>9} {'ours':>7} {'base':>7} {'ratio':>6} {'ours min':>8} {'base min':>8}"
        f" {'ours s':>7} {'(wall)':>7} {'base s':>7}",
    ]
    for row in report["fresh"]:
        lines.append(
            f"{row['gpus']:>7} x {row['slots_per_gpu']:<2} {row['load']:>9} {row['ours']:7.4f} {row['baseline']:7.4f}"
            f" {row['ours'] / row['baseline']:6.3f} {row['ours_min_layer']:8.4f} {row['baseline_min_layer']:8.4f}"
            f" {row['ours_seconds']:7.3f} {row['ours_wall_seconds']:7.3f} {row['baseline_seconds']:7.3f}"
        )
    lines += [
        "",
        f"Drift (x lognormal(0, {DRIFT_SIGMA}) per step): ours incremental with a {BUDGET:.0%} budget vs the baseline"
        " re-solved from scratch",
        f"{'GPUs x slots':>12} {'load':>9} {'step':>4} {'stale':>7} {'ours':>7} {'base':>7} {'ours mv':>8}"
        f" {'base mv':>8} {'ours GB':>8} {'base GB':>8} {'mv ratio':>8} {'ours s':>7} {'(wall)':>7} {'base s':>7}",
    ]
    for row in report["drift"]:
        lines.append(
            f"{row['gpus']:>7} x {row['slots_per_gpu']:<2} {row['load']:>9} {row['step']:>4} {row['stale']:7.4f}"
            f" {row['ours']:7.4f} {row['baseline']:7.4f} {row['ours_moves']:8d} {row['baseline_moves']:8d}"
            f" {row['ours_bytes'] / 1e9:8.1f} {row['baseline_bytes'] / 1e9:8.1f}"
            f" {row['ours_moves'] / max(row['baseline_moves'], 1):8.3f}"
            f" {row['ours_seconds']:7.3f} {row['ours_wall_seconds']:7.3f} {row['baseline_seconds']:7.3f}"
        )
    lines += [
        "",
        f"Balance vs moves after one drift step (sigma {DRIFT_SIGMA}) and a shock (sigma {SHOCK_SIGMA})",
        f"{'GPUs x slots':>12} {'drift':>6} {'budget':>9} {'moves':>7} {'moved':>7} {'GB':>8} {'ours':>7}"
        f" {'base fresh':>10} {'ours s':>7} {'(wall)':>7}",
    ]
    for row in report["curve"]:
        budget = "unlimited" if row["budget_fraction"] is None else f"{row['budget_fraction']:.0%}"
        lines.append(
            f"{row['gpus']:>7} x {row['slots_per_gpu']:<2} {row['drift']:>6} {budget:>9} {row['moves']:7d}"
            f" {row['moved_fraction']:7.1%} {row['bytes'] / 1e9:8.1f} {row['balancedness']:7.4f}"
            f" {row['baseline_fresh']:10.4f} {row['seconds']:7.3f} {row['wall_seconds']:7.3f}"
        )
    lines += [
        "",
        f"Node locality: one drift step, {BUDGET:.0%} budget, without and with gpus_per_node={GPUS_PER_NODE}",
        f"{'GPUs x slots':>12} {'per node':>8} {'moves':>7} {'cross-node':>10} {'ours':>7} {'ours s':>7}",
    ]
    for row in report["locality"]:
        per_node = "-" if row["gpus_per_node"] is None else str(row["gpus_per_node"])
        lines.append(
            f"{row['gpus']:>7} x {row['slots_per_gpu']:<2} {per_node:>8} {row['moves']:7d}"
            f" {row['cross_node_moves']:10d} {row['balancedness']:7.4f} {row['seconds']:7.3f}"
        )
    lines += [
        "",
        f"Shock (x lognormal(0, {SHOCK_POP_SIGMA}), two experts per layer swapping popularity), from ours' fresh"
        " placement of the load before; balancedness mean over layers (min layer), CPU seconds (wall)",
        f"{'GPUs x slots':>12} {'load':>9} {'method':>29} {'balance':>7} {'min':>7} {'moves':>7} {'moved':>7}"
        f" {'GB':>8} {'s':>7} {'(wall)':>7}",
    ]
    for row in report["shock"]:
        lines.append(
            f"{row['gpus']:>7} x {row['slots_per_gpu']:<2} {row['load']:>9} {row['method']:>29}"
            f" {row['balancedness']:7.4f} {row['min_layer']:7.4f} {row['moves']:7d} {row['moved_fraction']:7.1%}"
            f" {row['bytes'] / 1e9:8.1f} {row['seconds']:7.3f} {row['wall_seconds']:7.3f}"
        )
    lines += ["", "Targets:"] + [f"  {name}: {'met' if ok else 'NOT met'}" for name, ok in report["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2 eplb bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="a small, fast variant (4 layers x 48 experts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads (default 0)")
    parser.add_argument("--shock", action="store_true", help="only the shock suite (the same loads as in a full run)")
    args = parser.parse_args(argv)
    pin_to_one_core()
    report = run(QUICK if args.quick else FULL, args.seed, only_shock=args.shock)
    report["scale"] = asdict(QUICK if args.quick else FULL)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
