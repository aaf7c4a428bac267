"""The acceptance of the operator on any cluster: CRDs applied, `k2 operator run`, both examples applied ->
GPU-requesting pods, an ExpertPlacement, K2Serving Available=True, training pods with MASTER_ADDR and WORLD_SIZE;
deleting the K2Serving removes all its children.

On a cluster whose nodes really run pods the worker image must exist; on the local control plane kwok runs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.operator.harness import env_of, running_operator
from tests.operator.resources import example, kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import apply, get, has_condition, items
from tests.support.waits import wait_for

pytestmark = pytest.mark.e2e


def _example(name: str) -> dict[str, Any]:
    """The example as is on K2_E2E_KUBECONFIG's cluster; on the local control plane pinned to the kwok nodes, which
    fake the pods (its real node has two CPUs, too few for both examples)."""
    return example(name) if os.environ.get("K2_E2E_KUBECONFIG") else kwok_example(name)


def test_examples_end_to_end(e2e_cluster: Cluster, e2e_namespace: str, e2e_crds: None, tmp_path: Path) -> None:
    cluster, namespace = e2e_cluster, e2e_namespace
    with running_operator(cluster, namespace, tmp_path) as operator:
        training = _example("k2training-debug.yaml")
        training["metadata"]["annotations"] = {"k2.ai/fake-run-duration": "600s"}  # kwok only; ignored elsewhere
        apply(cluster, _example("k2serving-debug.yaml"), namespace=namespace)
        apply(cluster, training, namespace=namespace)
        wait_for(
            "K2Serving Available",
            lambda: has_condition(cluster, "k2serving/k2-debug-serve", "Available", namespace=namespace),
            300,
        )
        assert get(cluster, "expertplacement/k2-debug-serve", namespace=namespace)["spec"]["generation"] >= 1
        wait_for(
            "both groups ready",
            lambda: (
                get(cluster, "k2serving/k2-debug-serve", namespace=namespace).get("status", {}).get("readyRanks") == 4
            ),
            300,
        )
        workers = wait_for(
            "2 training pods",
            lambda: (
                (p := items(cluster, "pods", namespace=namespace, selector="app.kubernetes.io/instance=k2-debug-train"))
                and len(p) == 2
                and p
            ),
            300,
        )
        for pod in workers:
            variables = env_of(pod["spec"]["containers"][0])
            assert variables["WORLD_SIZE"] == "2" and variables["MASTER_ADDR"].startswith("k2-debug-train-worker-")
        ranks = items(
            cluster,
            "pods",
            namespace=namespace,
            selector="app.kubernetes.io/instance=k2-debug-serve,app.kubernetes.io/component=rank",
        )
        assert len(ranks) == 4
        assert all("nvidia.com/gpu" in p["spec"]["containers"][0]["resources"]["limits"] for p in [*ranks, *workers])

        cluster.kubectl("delete", "-n", namespace, "k2serving/k2-debug-serve", "--wait=true", "--timeout=120s")
        kinds = "statefulsets,deployments,services,configmaps,expertplacements,serviceaccounts,roles,rolebindings,pods"
        wait_for(
            "children gone",
            lambda: (
                not items(cluster, kinds, namespace=namespace, selector="app.kubernetes.io/instance=k2-debug-serve")
            ),
            180,
        )
        cluster.kubectl("delete", "-n", namespace, "k2training/k2-debug-train", "--wait=true", "--timeout=120s")
        assert operator.errors() == [], operator.logs()
