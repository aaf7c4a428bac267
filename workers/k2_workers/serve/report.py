"""A serving rank tells the operator which placement generation it runs: an annotation on its own pod.

The operator counts the ranks whose annotation matches the generation in force and writes the ExpertPlacement's
appliedRanks/appliedGeneration (see k2_operator.status.placement). Outside a cluster this is skipped quietly; a
failed patch is logged and retried with the next generation or restart, never raised into serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from k2_api.contract import Annotations, Env
from k2_workers.incluster import InClusterClient

log = logging.getLogger(__name__)


class AppliedGenerationReporter:
    def __init__(self, client: InClusterClient | None, pod_name: str | None) -> None:
        self._client = client if pod_name else None
        self._path = f"/api/v1/namespaces/{client.namespace}/pods/{pod_name}" if client and pod_name else ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AppliedGenerationReporter:
        return cls(InClusterClient.from_env(env), env.get(Env.POD_NAME))

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def report(self, generation: int) -> None:
        if self._client is None:
            return
        body = {"metadata": {"annotations": {Annotations.APPLIED_GENERATION: str(generation)}}}
        try:
            self._client.merge_patch(self._path, body)
        except Exception as error:  # the API server may be briefly unavailable
            log.warning("could not report applied placement generation %d: %s", generation, error)
