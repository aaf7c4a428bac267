"""What only the fake does, or does beyond the shared scenarios of test_kube_semantics.py: cascading deletes,
injected faults, the write log, list-map merging of spec.layers, and the flat field form it tracks ownership in."""

from __future__ import annotations

from typing import Any

import pytest

from k2_api.kube import Invalid, Unavailable
from k2_api.kube.fake import FakeCluster
from k2_api.kube.fields import Item, fields_v1, flatten, merge_patch, unflatten


def cm(name: str, owner_uid: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "p", "uid": owner_uid}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def test_flatten_keeps_list_maps_per_element_and_round_trips() -> None:
    body = {
        "spec": {"layers": [{"layer": 0, "slots": [[0, 1]]}, {"layer": 1, "slots": [[1, 0]]}], "empty": {}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "tags": ["a", "b"]},
    }
    flat = flatten(body)
    assert flat[("spec", "layers", Item("layer", 1), "slots")] == [[1, 0]]
    assert flat[("status", "tags")] == ["a", "b"]  # other lists are atomic
    assert flat[("spec", "empty")] == {}
    assert unflatten(flat) == body
    tree = fields_v1([("status", "conditions", Item("type", "Ready"), "status")])
    assert tree == {"f:status": {"f:conditions": {'k:{"type":"Ready"}': {".": {}, "f:status": {}}}}}


def test_merge_patch_follows_rfc_7386() -> None:
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}, "l": [1]}, {"b": {"c": None, "e": 4}, "l": [2]}) == {
        "a": 1,
        "b": {"d": 3, "e": 4},
        "l": [2],
    }


def test_layers_of_two_managers_merge_by_layer() -> None:
    fake = FakeCluster()
    base = {"apiVersion": "k2.ai/v1alpha1", "kind": "ExpertPlacement", "metadata": {"name": "x", "namespace": "ns"}}
    fake.client("a").apply(base | {"spec": {"layers": [{"layer": 0, "slots": [[0]]}]}})
    merged = fake.client("b").apply(base | {"spec": {"layers": [{"layer": 1, "slots": [[1]]}]}})
    assert merged["spec"]["layers"] == [{"layer": 0, "slots": [[0]]}, {"layer": 1, "slots": [[1]]}]


def test_generation_counts_spec_changes_only() -> None:
    fake = FakeCluster()
    kube = fake.client("m")
    first = kube.apply(cm("c", a="1"))
    relabelled = kube.apply(cm("c", a="1") | {"metadata": {"name": "c", "namespace": "ns", "labels": {"x": "y"}}})
    changed = kube.apply(cm("c", a="2"))
    assert [o["metadata"]["generation"] for o in (first, relabelled, changed)] == [1, 1, 2]
    versions = [int(o["metadata"]["resourceVersion"]) for o in (first, relabelled, changed)]
    assert versions == sorted(set(versions))


def test_delete_cascades_to_dependents() -> None:
    fake = FakeCluster()
    kube = fake.client("m")
    parent = kube.apply(cm("p"))
    child = kube.apply(cm("child", owner_uid=parent["metadata"]["uid"]))
    kube.apply(cm("grandchild", owner_uid=child["metadata"]["uid"]))
    kube.apply(cm("stranger", owner_uid="someone-else"))
    assert kube.delete("ConfigMap", "ns", "p")
    assert [o["metadata"]["name"] for o in kube.list("ConfigMap", "ns")] == ["stranger"]


def test_injected_faults_hit_the_next_matching_calls_only() -> None:
    fake = FakeCluster()
    kube = fake.client("m")
    kube.apply(cm("c"))
    fake.fail("get", "ConfigMap", Unavailable("503", 503), times=2)
    for _ in range(2):
        with pytest.raises(Unavailable):
            kube.get("ConfigMap", "ns", "c")
    assert kube.get("ConfigMap", "ns", "c") is not None
    assert kube.list("ConfigMap", "ns")  # other verbs were never affected


def test_the_write_log_records_every_write_and_its_manager() -> None:
    fake = FakeCluster()
    fake.client("a").apply(cm("c"))
    fake.client("b").delete("ConfigMap", "ns", "c")
    fake.client("b").delete("ConfigMap", "ns", "c")
    assert [(c.verb, c.name, c.manager) for c in fake.calls] == [
        ("apply", "c", "a"),
        ("delete", "c", "b"),
        ("delete", "c", "b"),
    ]
    assert len(fake.writes("delete")) == 2 and fake.writes("apply", "Pod") == []


def test_names_and_kinds_are_checked() -> None:
    kube = FakeCluster().client("m")
    with pytest.raises(Invalid, match="namespace"):
        kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
    with pytest.raises(ValueError, match="kind: 'Widget'"):
        kube.get("Widget", "ns", "w")


def test_list_map_elements_keep_their_order_through_every_write() -> None:
    fake = FakeCluster()
    layers = [{"layer": index, "slots": [[index]]} for index in range(12)]
    body = {"apiVersion": "k2.ai/v1alpha1", "kind": "ExpertPlacement", "metadata": {"name": "x", "namespace": "ns"}}
    created = fake.client("a").create(body | {"spec": {"layers": layers}})
    assert created is not None and [e["layer"] for e in created["spec"]["layers"]] == list(range(12))
    applied = fake.client("b").apply(body | {"spec": {"layers": layers[::-1][:3]}})
    assert [e["layer"] for e in applied["spec"]["layers"]] == list(range(12))
