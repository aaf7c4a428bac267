"""The one Event body both implementations post."""

from __future__ import annotations

import datetime as dt
import uuid

from k2_api.kube.protocol import Object, ObjectRef

MAX_MESSAGE = 1024


def event_body(ref: ObjectRef, event_type: str, reason: str, message: str, component: str, at: dt.datetime) -> Object:
    """A core/v1 Event about `ref` from `component`, with a unique name (`<object>.<random>`, as kubectl shows)."""
    if event_type not in ("Normal", "Warning"):
        raise ValueError(f"type: {event_type!r} must be Normal or Warning")
    when = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved: Object = {"apiVersion": ref.api_version, "kind": ref.kind, "name": ref.name, "namespace": ref.namespace}
    if ref.uid is not None:
        involved["uid"] = ref.uid
    if ref.resource_version is not None:
        involved["resourceVersion"] = ref.resource_version
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{ref.name}.{uuid.uuid4().hex[:12]}", "namespace": ref.namespace},
        "involvedObject": involved,
        "type": event_type,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
    }
