"""The WSD learning-rate schedule of the K2 report: linear warmup, a constant stage, then cosine decay to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WSDSchedule:
    """lr(step) for 1-based optimizer steps. `decay_start` is the last step at the peak; decay ends at
    `decay_start + decay_steps` with `min_lr`, and stays there afterwards."""

    peak_lr: float
    warmup_steps: int
    decay_start: int
    decay_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.peak_lr < 0 or self.min_lr < 0:
            raise ValueError("learning rates must be >= 0")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.decay_start < self.warmup_steps:
            raise ValueError("the decay must start after the warmup (decay_start >= warmup_steps)")

    def __call__(self, step: int) -> float:
        return wsd_lr(step, self.peak_lr, self.warmup_steps, self.decay_start, self.decay_steps, self.min_lr)


def wsd_lr(step: int, peak_lr: float, warmup_steps: int, decay_start: int, decay_steps: int, min_lr: float) -> float:
    """Warmup: peak·step/warmup for step <= warmup; constant peak until decay_start; then a cosine from peak to min_lr
    over decay_steps steps."""
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if step <= decay_start or decay_steps == 0:
        return peak_lr if step <= decay_start else min_lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_for_run(
    peak_lr: float, total_steps: int, warmup_steps: int, decay_steps: int, final_lr_ratio: float
) -> WSDSchedule:
    """Warmup, then constant, then the last `decay_steps` of the run decay to `final_lr_ratio`·peak. Warmup and
    decay are shortened when they do not fit (e.g. a local run with fewer --steps than the manifest's)."""
    warmup = min(warmup_steps, total_steps)
    decay = min(decay_steps, total_steps - warmup)
    return WSDSchedule(peak_lr, warmup, total_steps - decay, decay, peak_lr * final_lr_ratio)
