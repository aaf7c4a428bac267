"""Stored-looking K2 resources for the pure tests: the examples with the metadata the API server adds."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from k2_api import K2Serving, K2Training
from tests.support.paths import ROOT

EXAMPLES = ROOT / "examples"


def example(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return body


def stored(
    body: dict[str, Any], namespace: str = "ns1", uid: str = "00000000-0000-4000-8000-000000000001"
) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["metadata"].update({"namespace": namespace, "uid": uid, "generation": 1, "resourceVersion": "1"})
    return out


def training(**spec: Any) -> K2Training:
    body = stored(example("k2training-debug.yaml"))
    body["spec"].update(spec)
    return K2Training.model_validate(body)


def serving(**spec: Any) -> K2Serving:
    body = stored(example("k2serving-debug.yaml"))
    body["spec"].update(spec)
    return K2Serving.model_validate(body)


# The kwok nodes' label (hack/localcluster/nodes.py). Pods faked with the k2.ai/fake-* annotations must stay off the
# real node, whose kubelet would run them for real and ignore the annotations.
KWOK_NODES = {"type": "kwok"}


def kwok_example(name: str) -> dict[str, Any]:
    """An example whose worker pods the scheduler may place only on the kwok nodes (spec.scheduling.nodeSelector)."""
    body = example(name)
    scheduling = body["spec"].setdefault("scheduling", {})
    scheduling["nodeSelector"] = {**scheduling.get("nodeSelector", {}), **KWOK_NODES}
    return body
