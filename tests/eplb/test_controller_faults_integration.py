"""On the real local API server: conflicting and invalid human edits of an ExpertPlacement, and an outage."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_api import ExpertPlacement, round_robin
from k2_api.kube import Kube
from k2_api.kube.client import connect
from k2_eplb import kube as api
from k2_eplb.controller import Controller
from k2_eplb.controller_metrics import ControllerMetrics
from k2_eplb.planner import Reason
from tests.eplb.tcp_proxy import TcpProxy
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


class Outage(threading.Event):
    """The loop's sleep: after the first pass the API server goes away, after the second it comes back, the third
    pass is the last."""

    def __init__(self, proxy: TcpProxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.sleeps = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.sleeps += 1
        if self.sleeps == 1:
            self.proxy.down()
        elif self.sleeps == 2:
            self.proxy.up()
        else:
            self.set()
        return self.is_set()


def test_the_loop_lives_through_an_api_server_outage(
    cluster: Any, k2_crds: Any, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The controller reaches the real API server through a proxy that the test cuts for one pass and restores."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(serving_manifest(namespace, prometheus_url=None)))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(placement_manifest(namespace)))
    server = urllib.parse.urlsplit(cluster.server)
    assert server.hostname and server.port
    proxy = TcpProxy((server.hostname, server.port))
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://{server.hostname}:{proxy.port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    kube = connect(kubeconfig, field_manager=api.FIELD_MANAGER, timeout_s=5, retries=2, backoff_s=0.05)
    metrics = ControllerMetrics()
    ticks = itertools.count(int(time.time()), 60)  # every reading of the clock is a minute later: always due
    controller = Controller(kube, metrics=metrics, endpoints=lambda serving: [], clock=lambda: float(next(ticks)))
    stop = Outage(proxy)
    try:
        controller.run_forever(namespace, interval=0.1, stop=stop)
    finally:
        proxy.down()
    assert stop.sleeps == 3  # three passes: up, down, up again
    assert metrics.value("k2_eplb_pass_errors_total") == 1
    assert controller.failures == 1
    assert any(r.levelname == "ERROR" and "listing K2Servings failed" in r.getMessage() for r in caplog.records)
    # The passes before and after the outage planned the serving (generation 1 is not reported applied yet).
    skipped = metrics.value("k2_eplb_skipped_total", serving=NAME, namespace=namespace, reason="ApplyPending")
    assert skipped == 2
