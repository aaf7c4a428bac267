"""Applying a resource's children: only those that may differ from their manifest, concurrently, prerequisites
first.

A resync reconciles every resource every 30 s; re-applying each child each time (19 server-side applies per
serving + training pair) is a steady stream of writes that store nothing. So a child is applied unless all of:
- this process applied it before, to the same object (uid), from a manifest with the same digest;
- its observed copy, listed by the reconcile (one list per kind, by owner label), still has the resourceVersion
  that apply returned.

A hash annotation on the child could not decide this alone: it tells what the operator last applied, not whether
anyone wrote the object since. The resourceVersion does: any write by anyone (a hand edit of the spec, a label
removed, `kubectl scale`, a controller's status update) changes it, so the next reconcile applies again — a no-op
apply that stores nothing when only status changed — and remembers the new version. A deleted child is not
observed, so it is applied. The memory is per process and holds only what the last reconcile of each resource
desired: after an operator restart the first reconcile of each resource applies every child once, which also
repairs what changed while the operator was down. A child edit is repaired on the next reconcile: at once for the
watched workloads (StatefulSets, Deployments, Jobs), at the latest on the next resync for the rest. The metric
`k2_operator_child_applies_total{kind,result}` counts both outcomes (result `applied` or `unchanged`).

The first reconcile of a resource in a process (nothing remembered) applies every child, so it lists only the
kinds its decisions read (`kinds_to_observe`): on a machine where the API server is short of CPU, every request
before the workloads' apply adds to the time until their pods exist.

Order: two waves, each applied concurrently (at most `MAX_CONCURRENT_APPLIES` requests at once per reconcile).
First what another child needs when it is created: ServiceAccounts (a pod naming a missing one is refused),
ConfigMaps (its pods mount them) and Roles (the API server refuses a RoleBinding to a missing Role unless the binder
holds `bind`). Then the rest, workloads first: StatefulSets, Deployments and Jobs, then Services, RoleBindings and
NetworkPolicies (all in place long before a pod starts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from k2_api.kube import Object, Selector
from k2_operator import metrics
from k2_operator.builders.common import content_hash
from k2_operator.kube import AsyncKube

MAX_CONCURRENT_APPLIES = 8
PREREQUISITE_KINDS = frozenset({"ServiceAccount", "ConfigMap", "Role"})
"""Applied before every other child: what a pod or a RoleBinding needs to exist when it is created."""
WORKLOAD_KINDS = frozenset({"StatefulSet", "Deployment", "Job"})
"""Sent first in the second wave: the sooner they exist, the sooner their pods are scheduled."""

ChildKey = tuple[str, str, str]
"""(kind, namespace, name) of a child."""
OwnerKey = tuple[str, str, str]
"""(kind, namespace, name) of the K2 resource that owns the children."""


def key_of(obj: Mapping[str, object]) -> ChildKey:
    meta = obj["metadata"]
    assert isinstance(meta, Mapping)
    return (str(obj["kind"]), str(meta.get("namespace") or ""), str(meta["name"]))


@dataclass(frozen=True)
class Applied:
    """What an apply of one child returned, and from which manifest."""

    uid: str
    resource_version: str
    digest: str


def needs_apply(last: Applied | None, digest: str, observed: Mapping[str, object] | None) -> bool:
    """Whether the child must be applied: unless it is still exactly what the last apply of the same manifest left."""
    if last is None or observed is None or last.digest != digest:
        return True
    meta = observed.get("metadata")
    assert isinstance(meta, Mapping)
    return meta.get("uid") != last.uid or meta.get("resourceVersion") != last.resource_version


@dataclass
class AppliedChildren:
    """This process's memory of the children it applied, per owner."""

    owners: dict[OwnerKey, dict[ChildKey, Applied]] = field(default_factory=dict)

    def of(self, owner: OwnerKey) -> Mapping[ChildKey, Applied]:
        return self.owners.get(owner, {})

    def replace(self, owner: OwnerKey, applied: dict[ChildKey, Applied]) -> None:
        self.owners[owner] = applied

    def forget(self, owner: OwnerKey) -> None:
        self.owners.pop(owner, None)


APPLIED = AppliedChildren()


def kinds_to_observe(
    owner: OwnerKey, child_kinds: Iterable[str], read_kinds: Iterable[str], memory: AppliedChildren = APPLIED
) -> set[str]:
    """What a reconcile lists: the kinds its own decisions read, and every child kind once this process has applied
    the owner's children (to tell which are unchanged). Before that, every child is applied whatever is observed."""
    return set(read_kinds) | (set(child_kinds) if memory.of(owner) else set())


async def observe(
    kube: AsyncKube, namespace: str, selector: Selector, kinds: Iterable[str], owner_uid: str | None
) -> dict[ChildKey, Object]:
    """The owner's children of `kinds` (selected by `selector`, controlled by `owner_uid`), one list per kind, the
    lists concurrently."""
    kinds = sorted(set(kinds))
    listed = await asyncio.gather(*(kube.list(kind, namespace, selector) for kind in kinds))
    return {
        key_of(obj): obj
        for objects in listed
        for obj in objects
        if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences", []))
    }


async def apply_children(
    kube: AsyncKube,
    owner: OwnerKey,
    manifests: Sequence[Object],
    observed: Mapping[ChildKey, Object],
    memory: AppliedChildren = APPLIED,
) -> dict[ChildKey, Object]:
    """Applies the manifests that `needs_apply`, prerequisites then the rest; returns each child's current copy (as
    applied, else as observed). A failed prerequisite stops the second wave, not the rest of its own; the first
    failure (in manifest order) is raised once its wave is done."""
    last = memory.of(owner)
    remembered: dict[ChildKey, Applied] = {}
    current: dict[ChildKey, Object] = {}
    limit = asyncio.Semaphore(MAX_CONCURRENT_APPLIES)

    async def one(manifest: Object) -> None:
        key, digest = key_of(manifest), content_hash(manifest)
        seen = observed.get(key)
        if not needs_apply(last.get(key), digest, seen):
            assert seen is not None
            remembered[key], current[key] = last[key], seen
            metrics.CHILD_APPLIES.labels(key[0], "unchanged").inc()
            return
        async with limit:
            result = await kube.apply(manifest)
        metrics.CHILD_APPLIES.labels(key[0], "applied").inc()
        meta = result["metadata"]
        remembered[key] = Applied(str(meta.get("uid")), str(meta.get("resourceVersion")), digest)
        current[key] = result

    failures: list[BaseException] = []
    for wave in (
        [m for m in manifests if m["kind"] in PREREQUISITE_KINDS],
        sorted(
            (m for m in manifests if m["kind"] not in PREREQUISITE_KINDS), key=lambda m: m["kind"] not in WORKLOAD_KINDS
        ),
    ):
        outcomes = await asyncio.gather(*(one(m) for m in wave), return_exceptions=True)
        failures += [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            break
    memory.replace(owner, remembered)
    if failures:
        raise failures[0]
    return current
