"""The kstatus conditions every kind carries besides its own: Ready, Reconciling and Stalled.

kstatus (sigs.k8s.io/cli-utils, used by Flux) reads a custom resource as InProgress while `status.observedGeneration`
is behind `metadata.generation` or `Reconciling` is True, Failed while `Stalled` is True, then InProgress while
`Ready` is False and Current once it is True; `Ready` is also what `kubectl wait --for=condition=Ready` waits for.
Each status planner decides one `Summary` and turns it into these three conditions here, so they never contradict
each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from k2_operator.conditions import Desired


class KStatusConditionType(enum.StrEnum):
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class State(enum.Enum):
    READY = "ready"
    """At the state the spec asks for: running with every worker, succeeded, serving, applied, or suspended (kstatus
    reads Ready False as InProgress, so a suspended resource, which has nothing left to do, is Ready)."""
    RECONCILING = "reconciling"
    """Working towards it: creating, rolling, restarting, loading experts."""
    STALLED = "stalled"
    """Cannot get there without a change of spec: failed, or an invalid spec."""


KSTATUS_TYPES = tuple(t.value for t in KStatusConditionType)


@dataclass(frozen=True)
class Summary:
    state: State
    reason: str
    """One CamelCase word, written on the condition(s) this state sets True (and on Ready when it is False)."""
    message: str = ""


def kstatus_conditions(summary: Summary) -> list[Desired]:
    """Ready, Reconciling and Stalled for `summary`: exactly one of them True."""
    state, reason, message = summary.state, summary.reason, summary.message
    return [
        Desired(KStatusConditionType.READY, state is State.READY, reason, message),
        Desired(
            KStatusConditionType.RECONCILING,
            state is State.RECONCILING,
            reason if state is State.RECONCILING else "NotReconciling",
            message if state is State.RECONCILING else "",
        ),
        Desired(
            KStatusConditionType.STALLED,
            state is State.STALLED,
            reason if state is State.STALLED else "NotStalled",
            message if state is State.STALLED else "",
        ),
    ]
