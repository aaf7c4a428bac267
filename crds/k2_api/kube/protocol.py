"""`Kube`: the generic calls the operator and the EPLB controller make; `client.KubeClient` and `fake.FakeKube`
implement it with the same semantics.

Objects travel as plain JSON dicts (`Object`), as the API server sends them. Every write is made under the client's
one field manager. Absence is an answer for `get` (None), `create` (None: it exists already) and `delete` (False);
elsewhere it raises `NotFound`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

Object = dict[str, Any]
Selector = Mapping[str, str] | str
"""A label selector: `{key: value}` (all must match), or the API's string form (`a=b,c!=d,e,!f`)."""


@dataclass(frozen=True)
class ObjectRef:
    """What an Event points at."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str | None = None
    resource_version: str | None = None

    @classmethod
    def of(cls, obj: Object) -> ObjectRef:
        meta = obj["metadata"]
        return cls(
            obj["apiVersion"],
            obj["kind"],
            meta["namespace"],
            meta["name"],
            meta.get("uid"),
            meta.get("resourceVersion"),
        )


class Kube(Protocol):
    """The Kubernetes API as the control plane uses it."""

    @property
    def field_manager(self) -> str:
        """The manager of every write (and the Event source)."""
        ...

    def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        """The object, or None when it does not exist."""
        ...

    def list(self, kind: str, namespace: str | None = None, selector: Selector | None = None) -> list[Object]:
        """Objects of `kind` in `namespace` (None: every namespace) whose labels match `selector`."""
        ...

    def apply(self, manifest: Object) -> Object:
        """Server-side apply with force: creates the object when absent, owns every field in `manifest` (a field
        another manager set to a different value becomes this manager's alone; one set to the same value is shared),
        and removes the fields this manager set before and leaves out now, unless another manager holds them.
        A `metadata.resourceVersion` in `manifest` is a precondition (Conflict when stale)."""
        ...

    def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        """Server-side apply (force) of the status subresource: this manager's status fields, nothing else."""
        ...

    def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        """Creates the object; None when one of that name exists (a create-once child). `field_manager` records the
        fields under another component's manager: an object created on its behalf, whose fields are its own."""
        ...

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str
    ) -> Object:
        """JSON merge patch guarded by `resource_version`: Conflict when the object changed since it was read."""
        ...

    def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        grace_period_s: int | None = None,
    ) -> bool:
        """True when something was deleted; False when it did not exist. `grace_period_s` overrides a pod's
        terminationGracePeriodSeconds (and shortens that of one already terminating)."""
        ...

    def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        """Posts an Event (`Normal` or `Warning`) about `ref`."""
        ...
