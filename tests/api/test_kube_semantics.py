"""One scenario per behaviour, run against the fake API server and against the real one (kube-apiserver with the K2
CRDs): the fake must agree with the real thing on everything the control plane relies on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from k2_api import API_VERSION, ExpertPlacement
from k2_api.contract import FieldManagers
from k2_api.kube import Conflict, Kube, NotFound, Object, ObjectRef
from k2_api.kube.fake import FakeCluster
from tests.eplb.helpers import field_managers

USER = "k2-tests"
XP = ExpertPlacement.KIND


@dataclass
class Backend:
    """Three clients of one API server, one per field manager, and the namespace to work in."""

    operator: Kube
    eplb: Kube
    user: Kube
    namespace: str


@pytest.fixture(params=["fake", pytest.param("apiserver", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "fake":
        fake = FakeCluster()
        yield Backend(fake.client(FieldManagers.OPERATOR), fake.client(FieldManagers.EPLB), fake.client(USER), "ns")
        return
    from k2_api.kube.client import connect

    cluster = request.getfixturevalue("cluster")
    request.getfixturevalue("k2_crds")
    namespace = request.getfixturevalue("namespace")
    clients = [connect(cluster.kubeconfig, field_manager=m) for m in (FieldManagers.OPERATOR, FieldManagers.EPLB, USER)]
    yield Backend(*clients, namespace)


def spec(generation: int, slots: list[list[int]]) -> dict[str, Any]:
    return {
        "numLayers": 1,
        "numExperts": 4,
        "ranks": 2,
        "slotsPerRank": 2,
        "layers": [{"layer": 0, "slots": slots}],
        "generation": generation,
        "reason": f"generation {generation}",
    }


def placement(namespace: str, **metadata: Any) -> Object:
    return {
        "apiVersion": API_VERSION,
        "kind": ExpertPlacement.KIND,
        "metadata": {"name": "x", "namespace": namespace, "labels": {"app": "k2"}, **metadata},
        "spec": spec(1, [[0, 1], [2, 3]]),
    }


def condition(type_: str, reason: str) -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "lastTransitionTime": "2026-01-01T00:00:00Z"}


def config_map(namespace: str, data: dict[str, str], labels: dict[str, str] | None = None, name: str = "c") -> Object:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def rv(obj: Object | None) -> str:
    assert obj is not None
    version: str = obj["metadata"]["resourceVersion"]
    return version


def spec_fields(obj: Object, manager: str) -> set[str]:
    """The top-level spec fields `manager` owns, by managedFields (`numLayers`, `generation`, ...)."""
    owned: set[str] = set()
    for entry in obj["metadata"]["managedFields"]:
        if entry["manager"] == manager:
            owned |= {key[2:] for key in entry.get("fieldsV1", {}).get("f:spec", {}) if key.startswith("f:")}
    return owned


def test_create_once_then_a_forced_apply_takes_the_fields_it_changes(backend: Backend) -> None:
    ns = backend.namespace
    created = backend.operator.create(placement(ns))
    assert created is not None and created["metadata"]["generation"] == 1
    assert backend.operator.create(placement(ns)) is None  # create-once
    assert field_managers(created) == {FieldManagers.OPERATOR}

    manifest = placement(ns, resourceVersion=rv(created))
    manifest["spec"] = spec(2, [[0, 2], [1, 3]])
    del manifest["metadata"]["labels"]
    written = backend.eplb.apply(manifest)
    assert written["metadata"]["generation"] == 2 and written["spec"]["layers"][0]["slots"] == [[0, 2], [1, 3]]
    # Force takes what it changes; what it sets to the same value is shared with the creator.
    assert {"generation", "reason", "layers", "numLayers"} <= spec_fields(written, FieldManagers.EPLB)
    assert "generation" not in spec_fields(written, FieldManagers.OPERATOR)
    assert "numLayers" in spec_fields(written, FieldManagers.OPERATOR)
    assert written["metadata"]["labels"] == {"app": "k2"}  # the creator's labels stay

    with pytest.raises(Conflict):  # the resourceVersion it was read at is stale now
        backend.eplb.apply(manifest)
    manifest["metadata"]["resourceVersion"] = rv(written)
    again = backend.eplb.apply(manifest)  # the same content: a no-op
    assert rv(again) == rv(written) and again["metadata"]["generation"] == 2


def test_an_object_created_on_behalf_of_a_manager_is_that_managers_alone(backend: Backend) -> None:
    ns = backend.namespace
    created = backend.operator.create(placement(ns), field_manager=FieldManagers.EPLB)
    assert created is not None and field_managers(created, "metadata") == {FieldManagers.EPLB}
    manifest = placement(ns, resourceVersion=rv(created))
    manifest["spec"] = spec(2, [[1, 0], [3, 2]])
    written = backend.eplb.apply(manifest)
    assert field_managers(written) == {FieldManagers.EPLB}
    assert spec_fields(written, FieldManagers.EPLB) == set(spec(2, []))


def test_merge_patch_is_guarded_by_resource_version(backend: Backend) -> None:
    ns = backend.namespace
    created = backend.user.create(placement(ns))
    assert created is not None
    patched = backend.operator.merge_patch(
        ExpertPlacement.KIND, ns, "x", {"metadata": {"labels": {"b": "1"}}}, rv(created)
    )
    assert patched["metadata"]["labels"] == {"app": "k2", "b": "1"}
    assert int(rv(patched)) > int(rv(created)) and patched["metadata"]["generation"] == 1  # metadata only
    with pytest.raises(Conflict):
        backend.operator.merge_patch(ExpertPlacement.KIND, ns, "x", {"spec": {"generation": 5}}, rv(created))
    nulled = backend.operator.merge_patch(
        ExpertPlacement.KIND, ns, "x", {"metadata": {"labels": {"b": None}}}, rv(patched)
    )
    assert nulled["metadata"]["labels"] == {"app": "k2"}


def test_status_is_its_own_subresource_and_conditions_merge_per_manager(backend: Backend) -> None:
    ns = backend.namespace
    backend.user.create(placement(ns))
    backend.operator.apply_status(
        ExpertPlacement.KIND, ns, "x", {"appliedGeneration": 1, "conditions": [condition("Applied", "AllRanks")]}
    )
    status = {"predictedBalancedness": 0.9, "conditions": [condition("Planned", "Rebalanced")]}
    both = backend.eplb.apply_status(ExpertPlacement.KIND, ns, "x", status)
    assert {c["type"] for c in both["status"]["conditions"]} == {"Applied", "Planned"}
    assert both["status"]["appliedGeneration"] == 1 and both["status"]["predictedBalancedness"] == 0.9
    assert both["metadata"]["generation"] == 1  # status writes leave the generation alone
    assert field_managers(both, "status") == {FieldManagers.OPERATOR, FieldManagers.EPLB}

    # A manager that leaves out a field it owned removes it; the other manager's fields stay.
    dropped = backend.eplb.apply_status(
        ExpertPlacement.KIND, ns, "x", {"conditions": [condition("Planned", "Cooldown")]}
    )
    assert "predictedBalancedness" not in dropped["status"] and dropped["status"]["appliedGeneration"] == 1
    assert [c["reason"] for c in dropped["status"]["conditions"]] == ["AllRanks", "Cooldown"]

    # Writes of the object ignore status.
    manifest = placement(ns)
    manifest["status"] = {"appliedGeneration": 99}
    applied = backend.user.apply(manifest)
    assert applied["status"]["appliedGeneration"] == 1


def test_apply_removes_only_the_fields_no_other_manager_holds(backend: Backend) -> None:
    ns = backend.namespace
    backend.operator.apply(config_map(ns, {"a": "1", "b": "1"}, {"x": "1"}))
    backend.user.apply(config_map(ns, {"b": "2"}))  # force: b is the user's now
    kept = backend.operator.apply(config_map(ns, {"a": "1"}, {"x": "1"}))
    assert kept["data"] == {"a": "1", "b": "2"}
    gone = backend.operator.apply(config_map(ns, {}, {}))
    assert gone["data"] == {"b": "2"}
    assert not gone["metadata"].get("labels")


def test_absence(backend: Backend) -> None:
    ns = backend.namespace
    assert backend.operator.get(ExpertPlacement.KIND, ns, "none") is None
    assert backend.operator.delete(ExpertPlacement.KIND, ns, "none") is False
    with pytest.raises(NotFound):
        backend.operator.apply_status(ExpertPlacement.KIND, ns, "none", {"appliedGeneration": 1})
    with pytest.raises(NotFound):
        backend.operator.merge_patch(ExpertPlacement.KIND, ns, "none", {"metadata": {"labels": {"a": "b"}}}, "1")
    backend.operator.apply(config_map(ns, {"a": "1"}))
    assert backend.operator.delete("ConfigMap", ns, "c") is True
    assert backend.operator.get("ConfigMap", ns, "c") is None


def test_list_by_label_selector(backend: Backend) -> None:
    ns = backend.namespace
    for name, labels in [("a", {"app": "k2", "tier": "rank"}), ("b", {"app": "k2"}), ("c", {"app": "other"})]:
        backend.operator.apply(config_map(ns, {}, labels, name))

    def names(selector: Any) -> list[str]:
        return sorted(o["metadata"]["name"] for o in backend.operator.list("ConfigMap", ns, selector))

    assert names({"app": "k2"}) == ["a", "b"]
    assert names("app=k2,tier") == ["a"]
    assert names("app,app!=k2") == ["c"]  # (a namespace has ConfigMaps of its own, unlabelled)
    assert names("app=k2,!tier") == ["b"]
    assert all(o["kind"] == "ConfigMap" for o in backend.operator.list("ConfigMap", ns, {"app": "k2"}))


def test_events_name_the_object_and_the_component(backend: Backend) -> None:
    ns = backend.namespace
    created = backend.user.create(placement(ns))
    assert created is not None
    backend.eplb.event(ObjectRef.of(created), "Normal", "Rebalanced", "generation 2")
    events = [e for e in backend.user.list("Event", ns) if e["involvedObject"]["name"] == "x"]
    assert [(e["type"], e["reason"], e["message"]) for e in events] == [("Normal", "Rebalanced", "generation 2")]
    assert events[0]["source"]["component"] == FieldManagers.EPLB
    assert events[0]["involvedObject"]["uid"] == created["metadata"]["uid"]
