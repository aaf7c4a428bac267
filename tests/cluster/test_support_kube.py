"""The shared kubectl helpers (tests/support/kube.py) against the real API server: one behaviour for every test."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.support.cluster import Cluster, KubectlError
from tests.support.kube import apply, condition, exists, get, has_condition, items, patch


def _config_map(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"k2.ai/t": name}},
        "data": data,
    }


@pytest.mark.integration
def test_get_raises_on_a_missing_object_unless_told_it_may_be_missing(cluster: Cluster, namespace: str) -> None:
    with pytest.raises(KubectlError, match="NotFound"):
        get(cluster, "configmap/absent", namespace=namespace)
    assert get(cluster, "configmap/absent", namespace=namespace, missing_ok=True) is None
    assert not exists(cluster, "configmap/absent", namespace=namespace)
    assert has_condition(cluster, "configmap/absent", "Ready", namespace=namespace) is None


@pytest.mark.integration
def test_apply_and_patch_return_what_the_server_stored(cluster: Cluster, namespace: str) -> None:
    stored = apply(cluster, _config_map("one", k="v"), namespace=namespace)
    assert stored["metadata"]["namespace"] == namespace and stored["metadata"]["uid"]
    shown = cluster.kubectl("get", "configmap/one", "-n", namespace, "--show-managed-fields", "-o", "json").stdout
    assert [f["manager"] for f in json.loads(shown)["metadata"]["managedFields"]] == ["k2-tests"]
    patched = patch(cluster, "configmap/one", {"data": {"k": "w"}}, namespace=namespace)
    assert patched["data"] == {"k": "w"}
    assert get(cluster, "configmap", "one", namespace=namespace, missing_ok=True)["data"] == {"k": "w"}
    assert exists(cluster, "configmap/one", namespace=namespace)


@pytest.mark.integration
def test_apply_takes_yaml_text_with_several_documents(cluster: Cluster, namespace: str) -> None:
    stored = apply(cluster, yaml.safe_dump_all([_config_map("first"), _config_map("second")]), namespace=namespace)
    assert [o["metadata"]["name"] for o in stored["items"]] == ["first", "second"]


@pytest.mark.integration
def test_items_filters_by_selector_and_reads_several_kinds(cluster: Cluster, namespace: str) -> None:
    apply(cluster, _config_map("a"), namespace=namespace)
    apply(cluster, _config_map("b"), namespace=namespace)
    selected = items(cluster, "configmaps", namespace=namespace, selector="k2.ai/t=a")
    assert [o["metadata"]["name"] for o in selected] == ["a"]
    assert items(cluster, "configmaps,secrets", namespace=namespace, selector="k2.ai/t=none") == []


def test_condition_finds_the_condition_of_a_type() -> None:
    obj = {"status": {"conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "False"}]}}
    assert condition(obj, "B") == {"type": "B", "status": "False"}
    assert condition(obj, "C") is None
    assert condition({}, "A") is None


@pytest.mark.integration
def test_has_condition_returns_the_object_only_with_the_status_asked(cluster: Cluster) -> None:
    name = items(cluster, "nodes", selector="type=kwok")[0]["metadata"]["name"]
    ready = has_condition(cluster, f"node/{name}", "Ready")
    assert ready is not None and ready["metadata"]["name"] == name
    assert has_condition(cluster, f"node/{name}", "Ready", "False") is None
