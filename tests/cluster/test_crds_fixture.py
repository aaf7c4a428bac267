"""The k2_crds fixture installs the generated CRDs so that the API server serves the k2.ai kinds."""

from __future__ import annotations

import pytest

from tests.support.cluster import Cluster
from tests.support.kube import condition, get

pytestmark = pytest.mark.integration


def test_k2_crds_are_established_and_served(cluster: Cluster, k2_crds: list[str]) -> None:
    assert k2_crds, "the fixture returns the names of the CRDs it applied"
    assert all(name.endswith(".k2.ai") for name in k2_crds)
    for name in k2_crds:
        established = condition(get(cluster, "crd", name), "Established")
        assert established is not None and established["status"] == "True", name
    served = cluster.kubectl("api-resources", "--api-group=k2.ai", "-o", "name").stdout.split()
    assert sorted(served) == sorted(k2_crds)
