"""Migration-aware expert placement: balance GPU load per MoE layer, copying few experts when a placement exists.

Shapes: L layers, E logical experts, G GPUs, S slots per GPU, R = G·S slots per layer. An expert's tokens split evenly
over its replicas; a GPU's load is the sum over its slots; balancedness of a layer is mean GPU load / max GPU load.

From scratch, several candidates are built per layer: replica counts by the published greedy rule ("highest load
per replica gets the next slot", by water-filling), also capped at a few lower maximum counts (spreading extra slots
over colder experts often packs better: 200 instead of 232 on the published 8-GPU example), each packed heaviest
first with distinct experts per GPU; and the published greedy placement itself with its duplicates swapped away.
Each is polished by pairwise swaps (`balance_pairs`), the best per layer wins, and a local search (`improve`) that may
also change replica counts finishes it.

With `current`, the search starts from it instead and counts a move for every expert copied onto a GPU that held no
replica of it; `max_moves` bounds the total over all layers of one call. The budget is first split over layers by
need (every layer aiming at one common balancedness, so the worst layers get the most), spent in parallel on the
changes with the most value per copy, and what is left then goes to the best value per copy across layers
(intra-node copies preferred when `gpus_per_node` is given). Without a budget (`max_moves=None`), a layer whose fresh
solution is more balanced than the search's result is replaced by it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from k2_eplb.baseline import greedy_rebalance
from k2_eplb.local_search import Origin, allocate_budget, balance_pairs, improve
from k2_eplb.metrics import FloatArray, IntArray, balancedness, gpu_loads, replica_counts
from k2_eplb.packing import pack_distinct, repair_duplicates
from k2_eplb.replication import water_filled_counts
from k2_eplb.validation import check_gpus_per_node, check_load, check_max_moves, check_placement, check_shape

# Replica caps tried from scratch, as fractions of the uncapped greedy's largest count (1.0 is the greedy itself).
_CAP_FRACTIONS = (1.0, 0.75, 0.5)
# Round limits keep one call well under half a second at K2's shape on one core.
_PAIR_ROUNDS_CANDIDATES = 2
_PAIR_ROUNDS_BEST = 16
_SEARCH_ROUNDS_FRESH = 20
_SEARCH_ROUNDS_INCREMENTAL = 60
_SEARCH_ROUNDS_LEFTOVER = 20
_SEARCH_ROUNDS_UNBOUNDED = 20


def solve(
    load: npt.ArrayLike,
    num_gpus: int,
    slots_per_gpu: int,
    *,
    current: npt.ArrayLike | None = None,
    max_moves: int | None = None,
    gpus_per_node: int | None = None,
) -> IntArray:
    """Placement [layers, num_gpus, slots_per_gpu] (int64 logical expert ids) for `load` [layers, experts].

    Every expert gets >= 1 replica per layer and no GPU holds two replicas of one expert. With `current` (same shape
    as the result), at most `max_moves` copies in total over all layers (None: unbounded), and `max_moves=0` returns
    `current` unchanged. `max_moves` is ignored without `current`. Deterministic; raises ValueError naming the bad
    argument.
    """
    load_LE = check_load(load)
    num_layers, num_experts = load_LE.shape
    gpus, slots = check_shape(num_experts, num_gpus, slots_per_gpu)
    budget = check_max_moves(max_moves)
    per_node = check_gpus_per_node(gpus_per_node, gpus)
    if current is None:
        return solve_fresh(load_LE, gpus, slots)
    current_LGS = check_placement(current, num_layers, num_experts, (gpus, slots))
    if budget == 0:
        return current_LGS
    origin = Origin.of(current_LGS, num_experts, per_node)
    if budget is None:
        # copies are free: the cheap improvements from `current`, then any layer whose fresh solution is better
        placement, _ = improve(load_LE, current_LGS, origin=origin, max_rounds=_SEARCH_ROUNDS_UNBOUNDED)
        return _adopt_fresh_layers(load_LE, placement)
    # every layer in parallel towards one common balancedness, then what is left by best gain per copy
    loads_LG = gpu_loads(load_LE, current_LGS)
    placement, spent_L = improve(
        load_LE,
        current_LGS,
        origin=origin,
        budget=budget,
        layer_budget_L=allocate_budget(loads_LG, budget),
        target_L=loads_LG.mean(axis=1),
        max_rounds=_SEARCH_ROUNDS_INCREMENTAL,
    )
    left = budget - int(spent_L.sum())
    if left > 0:
        placement, _ = improve(load_LE, placement, origin=origin, budget=left, max_rounds=_SEARCH_ROUNDS_LEFTOVER)
    return placement


def solve_fresh(load_LE: FloatArray, num_gpus: int, slots_per_gpu: int) -> IntArray:
    """From-scratch placement (inputs already validated)."""
    num_layers, num_experts = load_LE.shape
    num_slots = num_gpus * slots_per_gpu
    uncapped = water_filled_counts(load_LE, num_slots, num_gpus)
    floor = -(-num_slots // num_experts)
    largest_L = uncapped.max(axis=1)
    caps = [np.clip(np.ceil(largest_L * f).astype(np.int64), floor, num_gpus) for f in _CAP_FRACTIONS[1:]]
    counts = [uncapped] + [water_filled_counts(load_LE, num_slots, cap) for cap in caps]
    num_candidates = len(counts)
    load_BE = np.tile(load_LE, (num_candidates, 1))
    packed = pack_distinct(load_BE, np.concatenate(counts), num_gpus, slots_per_gpu)
    # the published greedy's own packing, duplicates swapped away, competes too
    published = greedy_rebalance(load_LE, num_gpus, slots_per_gpu)
    too_many = replica_counts(published, num_experts).max(axis=1) > num_gpus  # cannot be made distinct
    published[too_many] = packed[:num_layers][too_many]
    packed = np.concatenate([packed, repair_duplicates(load_LE, published)])
    num_candidates += 1
    load_BE = np.concatenate([load_BE, load_LE])
    paired = balance_pairs(load_BE, packed, max_rounds=_PAIR_ROUNDS_CANDIDATES)
    score_CL = balancedness(load_BE, paired).reshape(num_candidates, num_layers)
    best_L = np.argmax(score_CL, axis=0)  # ties to the earlier candidate, the uncapped greedy first
    chosen = paired.reshape(num_candidates, num_layers, num_gpus, slots_per_gpu)[best_L, np.arange(num_layers)]
    chosen = balance_pairs(load_LE, chosen, max_rounds=_PAIR_ROUNDS_BEST)
    improved, _ = improve(load_LE, chosen, max_rounds=_SEARCH_ROUNDS_FRESH)
    return improved


def _adopt_fresh_layers(load_LE: FloatArray, placement_LGS: IntArray) -> IntArray:
    """Each layer replaced by its fresh solution where that is more balanced."""
    num_gpus, slots = placement_LGS.shape[1:]
    fresh = solve_fresh(load_LE, num_gpus, slots)
    better_L = balancedness(load_LE, fresh) > balancedness(load_LE, placement_LGS) + 1e-12
    result: IntArray = np.where(better_L[:, None, None], fresh, placement_LGS)
    return result
