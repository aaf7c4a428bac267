"""What a load reader returns, and the pure arithmetic both readers share.

Shapes: L MoE layers, E logical experts. Ranks are identified by their (group, rank) labels.

Per-group load and the merge rule: every group of a K2Serving serves with the one ExpertPlacement the serving owns
(the same slot tables on each group's ranks), so the readers keep each group's load (`group_load_LE`) and the planner
balances their sum over groups (`load_LE`, `merge_groups`): a placement's GPU loads are linear in the load, so the sum
is the total work each rank index does over all groups. The per-group loads serve to report how each group fares.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from k2_api.contract import MetricLabels

FloatArray = npt.NDArray[np.float64]

RankKey = tuple[str, str]
"""(group, rank) labels of one serving rank."""


class LoadReadError(RuntimeError):
    """The load could not be read at all (Prometheus unreachable, a malformed answer); the message says why."""


def token_count(value: object, what: str) -> float:
    """`value` (a number or its text, as Prometheus sends it) as a token count: finite and >= 0, else LoadReadError
    naming `what`."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise LoadReadError(f"{what}: value {value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise LoadReadError(f"{what}: value {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise LoadReadError(f"{what}: value {value!r} is not a finite, non-negative count")
    return number


def label_index(labels: Mapping[str, str], name: str, what: str) -> int:
    """The integer label `name` of a series, else LoadReadError naming `what` (a series without it is unusable)."""
    text = labels.get(name)
    if not isinstance(text, str) or not text.isdigit():
        raise LoadReadError(f"{what}: label {name}={text!r} is not a non-negative integer")
    return int(text)


@dataclass(frozen=True)
class LoadSample:
    """Per-expert load over a window, with what the planner needs to refuse partial data.

    `load_LE` sums the tokens of every reporting rank of every group (the merge rule); `group_load_LE` holds each
    group's own sum (keyed by the group label; empty when a reader did not split them). `num_samples` is the fewest
    samples any reporting series contributed to the window (an increase needs two). `measured_balancedness` comes from
    the slot counters (mean rank load / max rank load per group and layer, averaged), or None when no rank exports
    them.
    """

    load_LE: FloatArray
    ranks_seen: int
    ranks_expected: int
    num_samples: int
    window_seconds: float
    source: str
    measured_balancedness: float | None = None
    dropped_series: int = 0
    notes: tuple[str, ...] = field(default=())
    group_load_LE: Mapping[str, FloatArray] = field(default_factory=dict)

    @property
    def total_tokens(self) -> float:
        return float(self.load_LE.sum())


def counter_increase(values: Sequence[float]) -> float:
    """Increase of a counter over successive samples; a decrease is a reset, after which the new value counts."""
    total = 0.0
    for previous, current in itertools.pairwise(values):
        total += current - previous if current >= previous else current
    return total


def load_matrix(
    series: Iterable[tuple[Mapping[str, str], float]], num_layers: int, num_experts: int
) -> tuple[FloatArray, int]:
    """Sum `(labels, value)` pairs into [L, E] by their layer and expert labels; returns (matrix, dropped count).

    A series without integer layer and expert labels, or with a value that is not a finite count, makes the whole
    load unusable (LoadReadError). A series of a layer or expert the placement does not have (for example just after a
    reshape) is dropped and counted, never guessed.
    """
    load_LE = np.zeros((num_layers, num_experts), dtype=np.float64)
    dropped = 0
    for labels, value in series:
        what = f"series {dict(labels)}"
        layer = label_index(labels, MetricLabels.LAYER, what)
        expert = label_index(labels, MetricLabels.EXPERT, what)
        tokens = token_count(value, what)
        if layer >= num_layers or expert >= num_experts:
            dropped += 1
            continue
        with np.errstate(over="ignore"):  # checked below
            load_LE[layer, expert] += tokens
    if not np.isfinite(load_LE).all():
        raise LoadReadError("the load overflows a float64")
    return load_LE, dropped


def group_load_matrices(
    series: Iterable[tuple[Mapping[str, str], float]], num_layers: int, num_experts: int
) -> tuple[dict[str, FloatArray], int]:
    """`load_matrix` per group label (a series without one counts under ""); returns (group -> [L, E], dropped)."""
    by_group: dict[str, list[tuple[Mapping[str, str], float]]] = {}
    for labels, value in series:
        by_group.setdefault(labels.get(MetricLabels.GROUP, ""), []).append((labels, value))
    matrices: dict[str, FloatArray] = {}
    dropped = 0
    for group, rows in sorted(by_group.items()):
        matrices[group], lost = load_matrix(rows, num_layers, num_experts)
        dropped += lost
    return matrices, dropped


def merge_groups(group_load_LE: Mapping[str, FloatArray], num_layers: int, num_experts: int) -> FloatArray:
    """The load the one placement of all groups is planned on: the sum over groups (see the module)."""
    merged = np.zeros((num_layers, num_experts), dtype=np.float64)
    with np.errstate(over="ignore"):  # checked below
        for load_LE in group_load_LE.values():
            merged += load_LE
    if not np.isfinite(merged).all():
        raise LoadReadError("the load overflows a float64")
    return merged


def measured_balancedness(rank_layer_tokens: Mapping[tuple[str, str, int], float]) -> float | None:
    """Mean over (group, layer) of mean rank load / max rank load; keys are (group, rank, layer).

    A count that is not finite and non-negative is a LoadReadError (a sum of huge counts can overflow).
    """
    per_group_layer: dict[tuple[str, int], list[float]] = {}
    for (group, rank, layer), tokens in rank_layer_tokens.items():
        token_count(tokens, f"slot tokens of group {group!r} rank {rank!r} layer {layer}")
        per_group_layer.setdefault((group, layer), []).append(tokens)
    values = [float(np.mean(np.array(loads) / max(loads))) for loads in per_group_layer.values() if max(loads) > 0]
    return float(np.mean(values)) if values else None
