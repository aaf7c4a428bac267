"""Preemption: SIGTERM (and SIGINT) only set a flag; the loop finishes its step, checkpoints and exits
`ExitCodes.PREEMPTED` (never 0: only reaching spec.steps is completion)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT; `install()` only works in the main thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers `install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self._event.set()

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
