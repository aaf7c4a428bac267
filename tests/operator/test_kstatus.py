"""kstatus compliance of what the reconciles write: observedGeneration, and Ready, Reconciling and Stalled that never
contradict each other, in every state of every kind (the objects of tests/operator/health_objects.py).

`kstatus_of` follows the rules of sigs.k8s.io/cli-utils' kstatus for a custom resource (generation, then Reconciling,
then Stalled); the real library is not run here."""

from __future__ import annotations

from typing import Any

import pytest

from k2_operator.conditions import Desired
from k2_operator.status.kstatus import KSTATUS_TYPES, State, Summary, kstatus_conditions
from tests.operator.health_objects import CASES

# (kind, case) -> (kstatus, Ready)
EXPECTED: dict[tuple[str, str], tuple[str, bool]] = {
    ("K2Training", "stale"): ("InProgress", False),
    ("K2Training", "creating"): ("InProgress", False),
    ("K2Training", "running"): ("Current", True),
    ("K2Training", "restarting"): ("InProgress", False),
    ("K2Training", "suspended"): ("Current", False),
    ("K2Training", "failed"): ("Failed", False),
    ("K2Training", "succeeded"): ("Current", True),
    ("K2Serving", "stale"): ("InProgress", False),
    ("K2Serving", "creating"): ("InProgress", False),
    ("K2Serving", "available"): ("Current", True),
    ("K2Serving", "rebalancing"): ("Current", True),
    ("K2Serving", "degraded"): ("InProgress", False),
    ("K2Serving", "frontend-down"): ("InProgress", False),
    ("K2Serving", "suspended"): ("Current", False),
    ("ExpertPlacement", "applying"): ("InProgress", False),
    ("ExpertPlacement", "applied"): ("Current", True),
    ("ExpertPlacement", "applying-next"): ("InProgress", False),
    ("ExpertPlacement", "invalid"): ("Failed", False),
    ("ExpertPlacement", "suspended"): ("Current", False),
}


def _true(obj: dict[str, Any], condition_type: str) -> bool:
    conditions = obj.get("status", {}).get("conditions", [])
    return any(c["type"] == condition_type and c["status"] == "True" for c in conditions)


def kstatus_of(obj: dict[str, Any]) -> str:
    observed = obj.get("status", {}).get("observedGeneration")
    if observed is None or observed < obj["metadata"]["generation"]:
        return "InProgress"
    if _true(obj, "Reconciling"):
        return "InProgress"
    if _true(obj, "Stalled"):
        return "Failed"
    return "Current"


def test_the_expectations_cover_every_case() -> None:
    assert set(EXPECTED) == set(CASES)


@pytest.mark.parametrize(("kind", "case"), list(EXPECTED), ids=[f"{k}-{c}" for k, c in EXPECTED])
def test_kstatus_and_ready_in_each_state(kind: str, case: str) -> None:
    obj = CASES[(kind, case)][0]()
    status, ready = EXPECTED[(kind, case)]
    assert (kstatus_of(obj), _true(obj, "Ready")) == (status, ready), obj.get("status")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert set(KSTATUS_TYPES) <= set(conditions)
    assert sum(conditions[t]["status"] == "True" for t in KSTATUS_TYPES) <= 1
    assert all(conditions[t]["reason"] for t in KSTATUS_TYPES)  # metav1.Condition requires a reason


def test_ready_carries_the_reason_of_the_state_it_is_not_in() -> None:
    stalled = kstatus_conditions(Summary(State.STALLED, "InvalidSpec", "expert 7 has no replica"))
    assert stalled == [
        Desired("Ready", False, "InvalidSpec", "expert 7 has no replica"),
        Desired("Reconciling", False, "NotReconciling", ""),
        Desired("Stalled", True, "InvalidSpec", "expert 7 has no replica"),
    ]
    idle = kstatus_conditions(Summary(State.IDLE, "Suspended", "spec.suspend is true"))
    assert [d.status for d in idle] == [False, False, False] and idle[0].reason == "Suspended"
    reconciling = kstatus_conditions(Summary(State.RECONCILING, "RollingUpdate", "1/2 groups updated"))
    assert [d.status for d in reconciling] == [False, True, False] and reconciling[1].reason == "RollingUpdate"
