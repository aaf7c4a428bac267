"""What a load reader returns, and the pure arithmetic both readers share.

Shapes: L MoE layers, E logical experts. Ranks are identified by their (group, rank) labels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from k2_api.contract import MetricLabels

FloatArray = npt.NDArray[np.float64]

RankKey = tuple[str, str]
"""(group, rank) labels of one serving rank."""


class LoadReadError(RuntimeError):
    """The load could not be read at all (Prometheus unreachable, a malformed answer)."""


@dataclass(frozen=True)
class LoadSample:
    """Per-expert load over a window, with what the planner needs to refuse partial data.

    `load_LE` sums the tokens of every reporting rank of every group. `num_samples` is the fewest samples any reporting
    series contributed to the window (an increase needs two). `measured_balancedness` comes from the slot counters
    (mean rank load / max rank load per group and layer, averaged), or None when no rank exports them.
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

    Series whose labels are missing, not integers, or out of range are dropped and counted, never guessed.
    """
    load_LE = np.zeros((num_layers, num_experts), dtype=np.float64)
    dropped = 0
    for labels, value in series:
        layer = _index(labels.get(MetricLabels.LAYER), num_layers)
        expert = _index(labels.get(MetricLabels.EXPERT), num_experts)
        if layer is None or expert is None or not np.isfinite(value) or value < 0:
            dropped += 1
            continue
        load_LE[layer, expert] += value
    return load_LE, dropped


def measured_balancedness(rank_layer_tokens: Mapping[tuple[str, str, int], float]) -> float | None:
    """Mean over (group, layer) of mean rank load / max rank load; keys are (group, rank, layer)."""
    per_group_layer: dict[tuple[str, int], list[float]] = {}
    for (group, _rank, layer), tokens in rank_layer_tokens.items():
        per_group_layer.setdefault((group, layer), []).append(tokens)
    values = [float(np.mean(loads) / max(loads)) for loads in per_group_layer.values() if max(loads) > 0]
    return float(np.mean(values)) if values else None


def _index(text: str | None, size: int) -> int | None:
    if text is None or not text.isdigit():
        return None
    value = int(text)
    return value if value < size else None
