"""metav1-style conditions as wire dicts, and the diff that decides whether status must be written.

`lastTransitionTime` moves only when a condition's status changes; reason and message may change without a
transition. Status is computed as a pure function of (resource, observed children, now) and written only when it
differs from what the operator last wrote, so a steady resource causes no writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

Condition = dict[str, Any]


def rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Desired:
    """One condition as the reconcile wants it (the transition time is filled in by `merge`)."""

    type: str
    status: bool
    reason: str
    message: str = ""


def merge(
    previous: list[Condition], desired: list[Desired], generation: int | None, now: dt.datetime
) -> list[Condition]:
    """The new conditions list: one per desired type, keeping lastTransitionTime when the status is unchanged."""
    by_type = {c.get("type"): c for c in previous}
    merged = []
    for want in desired:
        status = "True" if want.status else "False"
        old = by_type.get(want.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        condition: Condition = {
            "type": want.type,
            "status": status,
            "reason": want.reason,
            "message": want.message,
            "lastTransitionTime": since or rfc3339(now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        merged.append(condition)
    return merged


def transitions(previous: list[Condition], current: list[Condition]) -> list[Condition]:
    """Conditions whose status changed (or that are new and True): each one becomes a Kubernetes Event."""
    before = {c.get("type"): c.get("status") for c in previous}
    return [c for c in current if before.get(c["type"], "False") != c["status"]]


def find(conditions: list[Condition], condition_type: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == condition_type), None)


def is_true(conditions: list[Condition], condition_type: str) -> bool:
    found = find(conditions, condition_type)
    return found is not None and found.get("status") == "True"


def owned_view(
    status: dict[str, Any] | None, fields: tuple[str, ...], condition_types: tuple[str, ...]
) -> dict[str, Any]:
    """The part of an observed status the operator owns, in the form `desired status` dicts have (for the diff)."""
    status = status or {}
    view = {key: status[key] for key in fields if key in status and status[key] is not None}
    conditions = [c for c in status.get("conditions", []) if c.get("type") in condition_types]
    view["conditions"] = sorted(conditions, key=lambda c: str(c.get("type")))
    return view


def normalized(status: dict[str, Any]) -> dict[str, Any]:
    """`status` with None values dropped and conditions sorted by type, for comparison with `owned_view`."""
    out = {k: v for k, v in status.items() if v is not None}
    out["conditions"] = sorted(status.get("conditions", []), key=lambda c: str(c.get("type")))
    return out


def changed(observed: dict[str, Any] | None, desired: dict[str, Any], condition_types: tuple[str, ...]) -> bool:
    fields = tuple(k for k in desired if k != "conditions")
    return owned_view(observed, fields, condition_types) != normalized(desired)
