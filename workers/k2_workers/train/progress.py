"""What rank 0 prints per step: one JSON line (pods, pipes, `--json`), or a progress bar with ETA on a terminal.

`render_bar` is a pure function of the numbers it shows; `ProgressBar` only keeps the clock readings and rewrites one
terminal line. The ETA is the remaining steps at the rate measured since the first step this process printed (that
step, which pays for warm-up and a resume, is not counted), so it is blank until the second step.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO

BAR_WIDTH = 24


class StepOutput(Protocol):
    def step(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def format_duration(seconds: float) -> str:
    """`MM:SS`, or `H:MM:SS` from an hour on (seconds rounded up, so a last second still shows)."""
    total = max(0, int(-(-seconds // 1)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def eta_seconds(step: int, steps: int, first_step: int, first_time: float, now: float) -> float | None:
    """Seconds left at the rate since `first_step` (printed at `first_time`); None before a second step."""
    done = step - first_step
    if done <= 0 or now <= first_time:
        return None
    return (steps - step) * (now - first_time) / done


def render_bar(
    step: int,
    steps: int,
    elapsed_s: float,
    eta_s: float | None,
    loss: float | None = None,
    tokens_per_s: float | None = None,
    width: int = BAR_WIDTH,
) -> str:
    """`step 12/40 [######------]  30% loss 2.3456 1,234 tok/s 00:07<00:16`: elapsed, then the ETA (`--:--`)."""
    fraction = min(max(step / steps, 0.0), 1.0) if steps > 0 else 1.0
    filled = int(fraction * width)
    parts = [f"step {step}/{steps}", f"[{'#' * filled}{'-' * (width - filled)}]", f"{fraction:4.0%}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    eta = "--:--" if eta_s is None else format_duration(eta_s)
    parts.append(f"{format_duration(elapsed_s)}<{eta}")
    return " ".join(parts)


class JsonLines:
    """One JSON object per step, flushed: what pods log and tests parse."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def step(self, record: Mapping[str, Any]) -> None:
        print(json.dumps(dict(record)), file=self._out, flush=True)

    def close(self) -> None:
        return


class ProgressBar:
    """Rewrites one terminal line per step (carriage return); ends it at the last step or on close."""

    def __init__(
        self,
        out: TextIO,
        steps: int,
        clock: Callable[[], float] = time.monotonic,
        columns: Callable[[], int] = lambda: shutil.get_terminal_size().columns,
    ) -> None:
        self._out, self._steps, self._clock, self._columns = out, steps, clock, columns
        self._started = clock()
        self._first: tuple[int, float] | None = None  # (step, clock) of the first record
        self._open = False  # a line is on screen without its newline

    def step(self, record: Mapping[str, Any]) -> None:
        now = self._clock()
        step = int(record["step"])
        if self._first is None:
            self._first = (step, now)
        eta = eta_seconds(step, self._steps, *self._first, now)
        line = render_bar(step, self._steps, now - self._started, eta, record.get("loss"), record.get("tokens_per_s"))
        line = line[: max(self._columns() - 1, 20)]
        self._out.write(f"\r{line}\x1b[K")  # erase what a longer previous line left
        self._open = step < self._steps
        if not self._open:
            self._out.write("\n")
        self._out.flush()

    def close(self) -> None:
        if self._open:
            self._out.write("\n")
            self._out.flush()
            self._open = False


def step_output(progress_bar: bool, out: TextIO, steps: int) -> StepOutput:
    """The bar when asked for (a terminal without `--json`), else JSON lines."""
    return ProgressBar(out, steps) if progress_bar else JsonLines(out)
