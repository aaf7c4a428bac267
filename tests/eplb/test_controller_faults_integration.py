"""Conflicting and invalid human edits of an ExpertPlacement, on the real local API server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from k2_api import ExpertPlacement, round_robin
from k2_api.kube import Kube
from k2_eplb import kube as api
from k2_eplb.controller import Controller
from k2_eplb.planner import Reason
from tests.eplb.test_controller_integration import NAME, placement_manifest, serving_manifest

pytestmark = [pytest.mark.integration]


def kubectl_json(cluster: Any, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "expertplacement", NAME, "-n", namespace, "-o", "json").stdout
    body: dict[str, Any] = json.loads(out)
    return body


def test_a_human_edit_between_read_and_write_wins_on_the_real_api_server(
    cluster: Any, k2_crds: Any, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serving now has 2 ranks, so the controller reshapes its 4-rank placement; a human writes a 2-rank
    generation 5 between the controller's read and its write. The API server refuses the controller's apply (409), the
    human's spec stays, and the next pass waits for generation 5 to apply instead of writing over it."""
    manifest = serving_manifest(namespace, prometheus_url=None, intervalSeconds=600)
    manifest["spec"]["ranksPerGroup"] = 2
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(placement_manifest(namespace)))
    status = json.dumps({"status": {"appliedGeneration": 1}})
    cluster.kubectl(
        "patch", "expertplacement", NAME, "-n", namespace, "--subresource=status", "--type=merge", "-p", status
    )
    human_layers = [t.to_dict() for t in round_robin(2, 8, 2, 5)]
    human = {"spec": {"ranks": 2, "slotsPerRank": 5, "layers": human_layers, "generation": 5, "reason": "by hand"}}
    read = api.get_placement

    def read_then_edit(kube: Kube, ns: str, name: str) -> ExpertPlacement | None:
        observed = read(kube, ns, name)
        monkeypatch.setattr(api, "get_placement", read)
        cluster.kubectl("patch", "expertplacement", NAME, "-n", namespace, "--type=merge", "-p", json.dumps(human))
        return observed

    monkeypatch.setattr(api, "get_placement", read_then_edit)
    controller = Controller(api.connect(cluster.kubeconfig), endpoints=lambda serving: [])
    assert controller.run_once(namespace) == {}
    assert controller.failures == 1
    spec = kubectl_json(cluster, namespace)["spec"]
    assert (spec["generation"], spec["reason"], spec["layers"]) == (5, "by hand", human_layers)
    decision = controller.run_once(namespace)[(namespace, NAME)]  # the next pass, interval or not
    assert (decision.reason, decision.message) == (
        Reason.APPLY_PENDING,
        "previous generation 5 not yet applied (applied: 1)",
    )
    assert kubectl_json(cluster, namespace)["spec"]["generation"] == 5


def test_a_human_written_invalid_placement_is_reported_on_the_real_api_server(
    cluster: Any, k2_crds: Any, namespace: str
) -> None:
    """Expert 7 missing from layer 1 passes the CRD's rules; the controller says so and writes no spec."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(serving_manifest(namespace, prometheus_url=None)))
    invalid = placement_manifest(namespace)
    invalid["spec"]["generation"] = 2
    invalid["spec"]["layers"][1]["slots"] = [
        [0 if e == 7 else e for e in row] for row in invalid["spec"]["layers"][1]["slots"]
    ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(invalid))
    controller = Controller(api.connect(cluster.kubeconfig), endpoints=lambda serving: [])
    for _ in range(2):
        decision = controller.run_once(namespace, force=True)[(namespace, NAME)]
        assert decision.reason is Reason.INVALID_PLACEMENT
        assert "experts without a replica: 7" in decision.message
    body = kubectl_json(cluster, namespace)
    assert body["spec"]["generation"] == 2 and body["spec"]["layers"] == invalid["spec"]["layers"]
    (planned,) = [c for c in body["status"]["conditions"] if c["type"] == "Planned"]
    assert (planned["status"], planned["reason"], planned["message"]) == ("False", "InvalidPlacement", decision.message)
    assert controller.failures == 0
