"""An in-memory API server for unit tests: `FakeCluster` holds the objects, `FakeKube` is one client of it (one
field manager), with the semantics of `KubeClient` against a real API server, as far as the control plane uses them:

- server-side apply merges per field manager: fields a manager applied before and leaves out now are removed unless
  another manager holds them; force takes a field whose value it changes from its previous owners and shares one it
  sets to the same value; `metadata.managedFields` lists each manager (operation Apply or Update, and
  `subresource: status`) with its fields, as the API server does;
- list-maps (`conditions` by type, `spec.layers` by layer) merge per element; other lists are atomic;
- kinds with a status subresource keep status apart: writes of the object ignore status, `apply_status` writes only
  status; `metadata.generation` counts changes outside metadata and status;
- `resourceVersion` increases on every change (a no-op write keeps it); a stale one is a `Conflict`; a missing
  object a `NotFound` (`None` from get, `False` from delete, and `create` of an existing one returns None);
- delete cascades to dependents (ownerReferences) at once, where the garbage collector would do it soon after.

Not modelled: validation (schemas, CEL), admission, defaulting, finalizers, watches, set-based selectors.
`FakeCluster.fail` injects an error into the next matching calls; `FakeCluster.calls` records every write.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from k2_api.kube import errors, fields
from k2_api.kube.events import event_body
from k2_api.kube.fields import Path
from k2_api.kube.protocol import Object, ObjectRef, Selector
from k2_api.kube.resources import resource
from k2_api.kube.selectors import matches

SYSTEM_METADATA = frozenset(
    {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields"}
)
Key = tuple[str, str, str]
Owner = tuple[str, str, str | None]
"""(manager, operation Apply|Update, subresource)."""


@dataclass(frozen=True)
class Call:
    """One write a client made (whether or not it changed anything)."""

    verb: str
    kind: str
    namespace: str | None
    name: str
    manager: str
    grace_period_s: int | None = None
    """A delete's override of the pods' grace (the fake deletes at once either way)."""


@dataclass
class _Stored:
    kind: str
    api_version: str
    namespace: str | None
    name: str
    uid: str
    created: str
    flat: dict[Path, Any]
    """User fields: labels, annotations, ownerReferences, spec, data, status, ..."""
    owners: dict[Owner, set[Path]]
    resource_version: int
    generation: int = 1


@dataclass
class _Fault:
    verb: str
    kind: str
    error: errors.KubeError
    times: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class FakeCluster:
    """The objects of one fake API server; `client(manager)` gives a `Kube` writing as that field manager."""

    clock: Callable[[], dt.datetime] = _now
    calls: list[Call] = field(default_factory=list)
    _objects: dict[Key, _Stored] = field(default_factory=dict)
    _revision: int = 0
    _faults: list[_Fault] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def client(self, field_manager: str) -> FakeKube:
        return FakeKube(self, field_manager)

    def fail(self, verb: str, kind: str, error: errors.KubeError, times: int = 1) -> None:
        """The next `times` calls of `verb` (a `Kube` method name) on `kind` raise `error`."""
        self._faults.append(_Fault(verb, kind, error, times))

    def writes(self, verb: str | None = None, kind: str | None = None) -> list[Call]:
        return [c for c in self.calls if (verb is None or c.verb == verb) and (kind is None or c.kind == kind)]

    # -- the operations, called by FakeKube under the lock --------------------------------------------------------

    def _check(self, verb: str, kind: str) -> None:
        resource(kind)  # an unknown kind fails as in the real client
        for fault in self._faults:
            if fault.verb == verb and fault.kind == kind and fault.times > 0:
                fault.times -= 1
                raise fault.error

    def _key(self, kind: str, namespace: str | None, name: str) -> Key:
        return (kind, (namespace or "") if resource(kind).namespaced else "", name)

    def _bump(self) -> int:
        self._revision += 1
        return self._revision

    def _render(self, stored: _Stored) -> Object:
        meta: Object = {"name": stored.name}
        if stored.namespace is not None:
            meta["namespace"] = stored.namespace
        meta |= {
            "uid": stored.uid,
            "resourceVersion": str(stored.resource_version),
            "generation": stored.generation,
            "creationTimestamp": stored.created,
        }
        body = fields.unflatten(stored.flat) if stored.flat else {}
        meta |= body.pop("metadata", {})
        meta["managedFields"] = [
            {
                "manager": manager,
                "operation": operation,
                "apiVersion": stored.api_version,
                "time": stored.created,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields.fields_v1(paths),
            }
            | ({"subresource": subresource} if subresource else {})
            for (manager, operation, subresource), paths in stored.owners.items()
            if paths
        ]
        return {"apiVersion": stored.api_version, "kind": stored.kind, "metadata": meta, **body}

    def _user_fields(self, manifest: Mapping[str, Any], part: str) -> dict[Path, Any]:
        """Flat user fields of `manifest` for a write of the object (`main`) or of its status subresource, as they
        arrive over the wire (JSON: enums as their values, tuples as lists)."""
        manifest = json.loads(json.dumps(manifest))
        if part == "status":
            return fields.flatten({"status": manifest.get("status", {})})
        body = {key: value for key, value in manifest.items() if key not in ("apiVersion", "kind")}
        meta = {k: v for k, v in dict(body.get("metadata") or {}).items() if k not in SYSTEM_METADATA}
        body["metadata"] = meta
        if not meta:
            del body["metadata"]
        if resource(manifest["kind"]).status_subresource:
            body.pop("status", None)
        return {p: v for p, v in fields.flatten(body).items() if p != ("metadata",)}

    def _store(self, stored: _Stored, before: Object | None) -> Object:
        """Bumps resourceVersion (and generation) when the write changed the object; returns it."""
        after = self._render(stored)
        if before is None or _comparable(before) != _comparable(after):
            stored.resource_version = self._bump()
            if before is not None and _spec_part(before) != _spec_part(after):
                stored.generation += 1
            after = self._render(stored)
        self._objects[self._key(stored.kind, stored.namespace, stored.name)] = stored
        return after

    def _new(self, manifest: Mapping[str, Any]) -> _Stored:
        kind, meta = manifest["kind"], manifest.get("metadata") or {}
        res = resource(kind)
        if not meta.get("name"):
            raise errors.Invalid(f"{kind}: metadata.name is required", 422)
        if res.namespaced and not meta.get("namespace"):
            raise errors.Invalid(f"{kind} {meta['name']}: metadata.namespace is required", 422)
        return _Stored(
            kind=kind,
            api_version=manifest.get("apiVersion") or res.api_version,
            namespace=meta.get("namespace") if res.namespaced else None,
            name=meta["name"],
            uid=str(uuid.uuid4()),
            created=self.clock().strftime("%Y-%m-%dT%H:%M:%SZ"),
            flat={},
            owners={},
            resource_version=0,
        )

    def _existing(self, kind: str, namespace: str | None, name: str) -> _Stored:
        stored = self._objects.get(self._key(kind, namespace, name))
        if stored is None:
            raise errors.NotFound(f"404 NotFound: {kind} {namespace}/{name} not found", 404)
        return stored

    def _apply(self, stored: _Stored, owner: Owner, applied: dict[Path, Any]) -> None:
        """Server-side apply with force of `applied` (flat) by `owner`: fields it changes are taken from their other
        owners, fields it sets to their current value are shared with them."""
        held_by_others = set().union(*(paths for o, paths in stored.owners.items() if o != owner))
        for path in stored.owners.get(owner, set()) - applied.keys():
            if path not in held_by_others:
                fields.remove(stored.flat, path)
        changed = {path for path, value in applied.items() if stored.flat.get(path) != value}
        for other, paths in stored.owners.items():
            if other != owner:
                paths.difference_update(changed)
        stored.owners[owner] = set(applied)
        for path, value in applied.items():
            fields.set_leaf(stored.flat, path, copy.deepcopy(value))

    def _update(self, stored: _Stored, owner: Owner, new: dict[Path, Any], part: str) -> None:
        """An Update (create, merge patch) of `part`: `new` replaces it; the owner gets the fields it changed."""
        in_part = {p for p in stored.flat if _part(p) == part}
        changed = {p for p, v in new.items() if stored.flat.get(p) != v}
        for path in in_part - new.keys():
            del stored.flat[path]
        for paths in stored.owners.values():
            paths &= set(new) | {p for p in stored.flat if _part(p) != part}
            paths -= changed
        stored.owners.setdefault(owner, set()).update(changed)
        for path, value in new.items():  # in order: list-map elements keep theirs
            if path in changed:
                fields.set_leaf(stored.flat, path, copy.deepcopy(value))

    def _delete(self, stored: _Stored) -> None:
        del self._objects[self._key(stored.kind, stored.namespace, stored.name)]
        self._bump()
        for dependent in list(self._objects.values()):
            refs = fields.unflatten(dependent.flat).get("metadata", {}).get("ownerReferences", [])
            if any(ref.get("uid") == stored.uid for ref in refs):
                self._delete(dependent)

    def _lookup(self, kind: str, namespace: str | None, name: str) -> _Stored | None:
        return self._objects.get(self._key(kind, namespace, name))

    def _matching(self, kind: str, namespace: str | None, selector: Selector | None) -> list[_Stored]:
        found = []
        for (k, ns, _), stored in sorted(self._objects.items()):
            if k != kind or (namespace is not None and resource(kind).namespaced and ns != namespace):
                continue
            labels = fields.unflatten(stored.flat).get("metadata", {}).get("labels", {}) if stored.flat else {}
            if matches(selector, labels):
                found.append(stored)
        return found


def _part(path: Path) -> str:
    return "status" if path[:1] == ("status",) else "main"


def _comparable(obj: Object) -> Object:
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "generation")}
    return {**obj, "metadata": meta}


def _spec_part(obj: Object) -> Object:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


class FakeKube:
    """One client of a `FakeCluster`: the `Kube` protocol, writing as `field_manager`."""

    def __init__(self, cluster: FakeCluster, field_manager: str) -> None:
        self.cluster = cluster
        self._field_manager = field_manager

    @property
    def field_manager(self) -> str:
        return self._field_manager

    def _update(self, stored: _Stored, manifest: Mapping[str, Any], manager: str | None = None) -> None:
        owner = (manager or self._field_manager, "Update", None)
        self.cluster._update(stored, owner, self.cluster._user_fields(manifest, "main"), "main")

    def _record(self, verb: str, kind: str, namespace: str | None, name: str, grace_s: int | None = None) -> None:
        self.cluster.calls.append(Call(verb, kind, namespace, name, self._field_manager, grace_s))

    def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        with self.cluster._lock:
            self.cluster._check("get", kind)
            stored = self.cluster._lookup(kind, namespace, name)
            return None if stored is None else self.cluster._render(stored)

    def list(self, kind: str, namespace: str | None = None, selector: Selector | None = None) -> list[Object]:
        with self.cluster._lock:
            self.cluster._check("list", kind)
            return [self.cluster._render(s) for s in self.cluster._matching(kind, namespace, selector)]

    def apply(self, manifest: Object) -> Object:
        cluster, kind, meta = self.cluster, manifest["kind"], manifest.get("metadata") or {}
        with cluster._lock:
            cluster._check("apply", kind)
            self._record("apply", kind, meta.get("namespace"), meta.get("name", ""))
            stored = cluster._lookup(kind, meta.get("namespace"), meta.get("name", ""))
            expected = meta.get("resourceVersion")
            if stored is None:
                if expected:
                    raise errors.Conflict(f"409 Conflict: {kind} {meta.get('name')} does not exist (yet)", 409)
                stored, before = cluster._new(manifest), None
            else:
                before = cluster._render(stored)
                if expected and expected != str(stored.resource_version):
                    raise errors.Conflict(f"409 Conflict: {kind} {stored.name} has changed since {expected}", 409)
            cluster._apply(stored, (self._field_manager, "Apply", None), cluster._user_fields(manifest, "main"))
            return cluster._store(stored, before)

    def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        cluster = self.cluster
        with cluster._lock:
            cluster._check("apply_status", kind)
            self._record("apply_status", kind, namespace, name)
            if not resource(kind).status_subresource:
                raise errors.NotFound(f"404 NotFound: {kind} has no status subresource", 404)
            stored = cluster._existing(kind, namespace, name)
            before = cluster._render(stored)
            applied = cluster._user_fields({"kind": kind, "status": dict(status)}, "status")
            cluster._apply(stored, (self._field_manager, "Apply", "status"), applied)
            return cluster._store(stored, before)

    def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        cluster, kind, meta = self.cluster, manifest["kind"], manifest.get("metadata") or {}
        with cluster._lock:
            cluster._check("create", kind)
            self._record("create", kind, meta.get("namespace"), meta.get("name", ""))
            if cluster._lookup(kind, meta.get("namespace"), meta.get("name", "")) is not None:
                return None
            stored = cluster._new(manifest)
            self._update(stored, manifest, field_manager)
            return cluster._store(stored, None)

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str
    ) -> Object:
        cluster = self.cluster
        with cluster._lock:
            cluster._check("merge_patch", kind)
            self._record("merge_patch", kind, namespace, name)
            stored = cluster._existing(kind, namespace, name)
            if resource_version != str(stored.resource_version):
                raise errors.Conflict(f"409 Conflict: {kind} {name} has changed since {resource_version}", 409)
            before = cluster._render(stored)
            patched = fields.merge_patch(before, dict(patch))
            self._update(stored, patched)
            return cluster._store(stored, before)

    def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        grace_period_s: int | None = None,
    ) -> bool:
        cluster = self.cluster
        with cluster._lock:
            cluster._check("delete", kind)
            self._record("delete", kind, namespace, name, grace_period_s)
            stored = cluster._lookup(kind, namespace, name)
            if stored is None:
                return False
            cluster._delete(stored)
            return True

    def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        body = event_body(ref, event_type, reason, message, self._field_manager, self.cluster.clock())
        with self.cluster._lock:
            self.cluster._check("event", "Event")
            self._record("event", "Event", ref.namespace, body["metadata"]["name"])
            stored = self.cluster._new(body)
            self._update(stored, body)
            self.cluster._store(stored, None)
