"""The operator's reconciles on the adapter's fake API server: create resources as a user would, run one reconcile
in-process, and read what it wrote. No cluster, no kopf, no subprocess."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

from k2_api.contract import Labels
from k2_api.kube import Object
from k2_api.kube.fake import FakeCluster
from k2_operator.kube import FIELD_MANAGER, AsyncKube
from tests.operator.resources import example

NS = "ns1"
USER = "k2-tests"
CONTROLLER_MANAGER = "kube-controller-manager"
Reconcile = Callable[[AsyncKube, str, str], Awaitable[None]]


class Env:
    def __init__(self) -> None:
        self.cluster = FakeCluster()
        self.user = self.cluster.client(USER)
        self.operator = self.cluster.client(FIELD_MANAGER)

    def create_example(self, file: str, **spec: Any) -> Object:
        body = copy.deepcopy(example(file))
        body["metadata"]["namespace"] = NS
        body["spec"].update(spec)
        created = self.user.create(body)
        assert created is not None
        return created

    def run(self, reconcile: Reconcile, name: str) -> None:
        asyncio.run(reconcile(AsyncKube(self.operator), NS, name))

    def get(self, kind: str, name: str) -> Object:
        found = self.user.get(kind, NS, name)
        assert found is not None, f"{kind} {name} does not exist"
        return found

    def names(self, kind: str) -> list[str]:
        return [o["metadata"]["name"] for o in self.user.list(kind, NS)]

    def patch_spec(self, kind: str, name: str, **spec: Any) -> None:
        current = self.get(kind, name)
        self.user.merge_patch(kind, NS, name, {"spec": spec}, current["metadata"]["resourceVersion"])

    def set_status(
        self, kind: str, name: str, status: dict[str, Any], manager: str = "kube-controller-manager"
    ) -> None:
        """Status as another component (a built-in controller, the workers) reports it."""
        self.cluster.client(manager).apply_status(kind, NS, name, status)

    def status_writes(self, kind: str) -> int:
        return len([c for c in self.cluster.writes("apply_status", kind) if c.manager == FIELD_MANAGER])

    def events(self) -> list[tuple[str, str]]:
        return [(e["type"], e["reason"]) for e in self.user.list("Event", NS)]


def controller_owner_uid(obj: Object) -> str | None:
    refs = [r for r in obj["metadata"].get("ownerReferences", []) if r.get("controller")]
    return refs[0]["uid"] if len(refs) == 1 else None


def condition(obj: Object, type_: str) -> dict[str, Any]:
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_]
    assert found, f"no {type_} condition in {obj.get('status')}"
    return dict(found[0])


def rank_pod(
    serving: str, group: int, rank: int, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
) -> Object:
    """A serving rank's Pod as its StatefulSet would create it (no status: the test reports it)."""
    meta: dict[str, Any] = {
        "name": f"{serving}-g{group}-{rank}",
        "namespace": NS,
        "labels": {
            "app.kubernetes.io/instance": serving,
            "app.kubernetes.io/component": "rank",
            Labels.GROUP: str(group),
            **(labels or {}),
        },
        "annotations": annotations or {},
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "k2", "image": "i"}]}}
