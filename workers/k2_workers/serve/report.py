"""A serving rank tells the operator which placement generation it runs: an annotation on its own pod.

The operator counts the ranks whose annotation matches the generation in force and writes the ExpertPlacement's
appliedRanks/appliedGeneration (see k2_operator.status.placement), which the EPLB controller waits for before it
plans again: a lost report would stall the balancer. So `report` only records the generation, and a background
thread patches the pod until the patch lands, retrying with exponential backoff; when a newer generation is applied
meanwhile, the newest is the one sent. Outside a cluster this is skipped quietly; serving never waits on it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping

from k2_api.contract import Annotations, Env
from k2_workers.incluster import InClusterClient

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0


def next_backoff(previous_s: float, max_s: float = MAX_RETRY_S) -> float:
    return min(2 * previous_s, max_s)


class AppliedGenerationReporter:
    def __init__(
        self,
        client: InClusterClient | None,
        pod_name: str | None,
        first_retry_s: float = FIRST_RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
    ) -> None:
        self._client = client if pod_name else None
        self._path = f"/api/v1/namespaces/{client.namespace}/pods/{pod_name}" if client and pod_name else ""
        self._first_retry_s = first_retry_s
        self._max_retry_s = max_retry_s
        self._changed = threading.Condition()
        self._wanted: int | None = None  # the newest generation applied
        self.reported: int | None = None  # the newest generation the API server took
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AppliedGenerationReporter:
        return cls(InClusterClient.from_env(env), env.get(Env.POD_NAME))

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def report(self, generation: int) -> None:
        """Record `generation` as applied; the background thread sends it (never blocks, never raises)."""
        if self._client is None:
            return
        with self._changed:
            self._wanted = generation
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="report-generation", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _loop(self) -> None:
        """Send the newest wanted generation until it lands, backing off after each failure."""
        delay_s = self._first_retry_s
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._wanted != self.reported)
                generation = self._wanted
            assert generation is not None
            if self._send(generation):
                delay_s = self._first_retry_s
                with self._changed:
                    self.reported = generation
                continue
            log.warning("will retry the report of generation %d in %.1fs", generation, delay_s)
            with self._changed:  # a newer generation cuts the wait short
                self._changed.wait_for(functools.partial(self._newer_than, generation), delay_s)
            delay_s = next_backoff(delay_s, self._max_retry_s)

    def _newer_than(self, generation: int) -> bool:
        return self._wanted != generation

    def _send(self, generation: int) -> bool:
        assert self._client is not None
        body = {"metadata": {"annotations": {Annotations.APPLIED_GENERATION: str(generation)}}}
        try:
            self._client.merge_patch(self._path, body)
        except Exception as error:  # the API server may be unavailable for a while
            log.warning("could not report applied placement generation %d: %s", generation, error)
            return False
        return True
