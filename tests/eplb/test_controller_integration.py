"""The EPLB controller against the real local API server, with a real Prometheus scraping loopback exporters.

Each test creates a K2Serving and its ExpertPlacement (no operator needed), marks generation 1 applied as the workers
would, feeds a load through the fake ranks, and runs one planning pass at a time with a clock the test controls.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from k2_api import ExpertPlacement, round_robin
from k2_api.contract import FieldManagers
from k2_api.kube.client import connect
from k2_eplb import controller as controller_module
from k2_eplb import kube as api
from k2_eplb.controller import Controller
from k2_eplb.controller_metrics import ControllerMetrics
from k2_eplb.metrics import count_moves, replica_counts
from k2_eplb.planner import Reason
from k2_operator.kube import AsyncKube
from k2_operator.serving import reconcile as serving_reconcile
from tests.eplb.helpers import field_managers
from tests.eplb.load_exporter import FakeServing, skewed_load
from tests.eplb.prometheus_server import Prometheus, running_prometheus
from tests.support.ports import free_port

pytestmark = [pytest.mark.integration]

NAME = "k2"
LAYERS, EXPERTS, RANKS, SLOTS = 2, 8, 4, 3  # ceil(8 / 4) + 1 redundant slot per rank
WINDOW = 6
BYTES_PER_EXPERT = 3 * 64 * 32 + 3 * 4  # hidden 64, moe_intermediate 32, fp8: weights + one block scale per matrix
INITIAL = np.array([t.slots for t in round_robin(LAYERS, EXPERTS, RANKS, SLOTS)], dtype=np.int64)
SKEWED = skewed_load(LAYERS, EXPERTS, hot={0: 12.0, 5: 5.0})
DRIFTED = skewed_load(LAYERS, EXPERTS, hot={3: 12.0, 6: 6.0})
BALANCED = replica_counts(INITIAL, EXPERTS).astype(np.float64)  # every slot of the initial placement gets equal load


def serving_manifest(namespace: str, prometheus_url: str | None, **eplb: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "enabled": True,
        "intervalSeconds": 1,
        "windowSeconds": WINDOW,
        "minImprovement": 0.02,
        "maxMovesFraction": 1.0,
        "cooldownSeconds": 600,
    }
    if prometheus_url:
        settings["prometheusUrl"] = prometheus_url
    settings.update(eplb)
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Serving",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {
                "config": {
                    "num_hidden_layers": LAYERS + 1,
                    "first_k_dense_replace": 1,
                    "n_routed_experts": EXPERTS,
                    "num_experts_per_tok": 2,
                    "hidden_size": 64,
                    "moe_intermediate_size": 32,
                },
                "dtype": "fp8",
            },
            "image": "k2-operator/worker:test",
            "groups": 1,
            "ranksPerGroup": RANKS,
            "redundantSlotsPerRank": 1,
            "eplb": settings,
        },
    }


def placement_manifest(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "ExpertPlacement",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "numLayers": LAYERS,
            "numExperts": EXPERTS,
            "ranks": RANKS,
            "slotsPerRank": SLOTS,
            "generation": 1,
            "reason": "initial",
            "layers": [{"layer": layer, "slots": INITIAL[layer].tolist()} for layer in range(LAYERS)],
        },
    }


class Env:
    """The objects of one test and handles on them."""

    def __init__(self, cluster: Any, namespace: str, fake: FakeServing, prometheus: Prometheus | None):
        self.cluster, self.namespace, self.fake, self.prometheus = cluster, namespace, fake, prometheus
        self.now = float(int(time.time()))  # whole seconds, as the rebalanced-at annotation stores them
        self.metrics = ControllerMetrics()
        self.kube = api.connect(cluster.kubeconfig)

    def create(self, **eplb: Any) -> None:
        url = self.prometheus.url if self.prometheus else None
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(serving_manifest(self.namespace, url, **eplb)))
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(placement_manifest(self.namespace)))
        self.mark_applied(1)

    def controller(self, **kwargs: Any) -> Controller:
        allowed = (self.prometheus.url,) if self.prometheus else ()  # the serving names it in spec.eplb.prometheusUrl
        return Controller(
            self.kube, metrics=self.metrics, clock=lambda: self.now, allowed_prometheus_urls=allowed, **kwargs
        )

    def reconcile(self, controller: Controller) -> Any:
        (serving,) = api.list_servings(self.kube, self.namespace)
        return controller.reconcile(serving)

    def placement(self) -> dict[str, Any]:
        out = self.cluster.kubectl("get", "expertplacement", NAME, "-n", self.namespace, "-o", "json").stdout
        body: dict[str, Any] = json.loads(out)
        return body

    def slots(self) -> np.ndarray:
        layers = sorted(self.placement()["spec"]["layers"], key=lambda entry: entry["layer"])
        return np.array([entry["slots"] for entry in layers], dtype=np.int64)

    def mark_applied(self, generation: int, **status: Any) -> None:
        patch = json.dumps({"status": {"appliedGeneration": generation, **status}})
        self.cluster.kubectl(
            "patch", "expertplacement", NAME, "-n", self.namespace, "--subresource=status", "--type=merge", "-p", patch
        )

    def planned(self) -> dict[str, Any]:
        conditions = self.placement().get("status", {}).get("conditions", [])
        (condition,) = [c for c in conditions if c["type"] == "Planned"]
        return dict(condition)

    def events(self) -> list[dict[str, Any]]:
        out = self.cluster.kubectl("get", "events", "-n", self.namespace, "-o", "json").stdout
        return [e for e in json.loads(out)["items"] if e["involvedObject"]["name"] == NAME]

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.value(name, serving=NAME, namespace=self.namespace, **labels)
        return 0.0 if value is None else value

    def reporting_ranks(self) -> int:
        assert self.prometheus is not None
        selector = f'k2_expert_tokens_total{{namespace="{self.namespace}"}}'
        return int(self.prometheus.scalar(f"count(count by (rank) ({selector}))") or 0)

    def wait_for_window(self) -> None:
        """Until Prometheus holds a full window of samples from every rank of this namespace."""
        prometheus = self.prometheus
        assert prometheus is not None
        promql = f'min(count_over_time(k2_expert_tokens_total{{namespace="{self.namespace}"}}[{WINDOW}s]))'

        def ready() -> bool:
            return self.reporting_ranks() == RANKS and (prometheus.scalar(promql) or 0) >= WINDOW

        prometheus.wait_for(ready, timeout=60, what=f"a full {WINDOW}s window from {RANKS} ranks")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeServing]:
    serving = FakeServing(NAME, num_layers=LAYERS, num_experts=EXPERTS, num_ranks=RANKS, slots=SLOTS, tokens_per_s=4000)
    serving.set_placement(INITIAL)
    yield serving
    serving.stop()


@pytest.fixture
def env(cluster: Any, k2_crds: list[str], namespace: str, fake: FakeServing, prometheus: Prometheus) -> Env:
    prometheus.set_targets(fake.targets, {"namespace": namespace})
    return Env(cluster, namespace, fake, prometheus)


@pytest.mark.prometheus
def test_rebalances_skew_then_waits_for_apply_and_cooldown(env: Env) -> None:
    env.create(maxMoves=4)
    applied = {"type": "Applied", "status": "True", "reason": "AllRanks", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    env.mark_applied(1, conditions=[applied])  # as the operator reports it
    env.fake.set_profile(SKEWED)
    env.fake.start()
    env.wait_for_window()
    controller = env.controller()

    decision = env.reconcile(controller)
    assert decision.reason is Reason.REBALANCED
    body = env.placement()
    assert body["spec"]["generation"] == 2
    new = env.slots()
    moves = count_moves(INITIAL, new)
    assert 0 < moves <= 4  # the absolute budget (4) is below maxMovesFraction x the layers' slots
    status = body["status"]
    assert status["movedExperts"] == moves
    assert status["movedBytes"] == moves * BYTES_PER_EXPERT
    assert status["predictedBalancedness"] == pytest.approx(decision.predicted_balancedness)
    assert decision.predicted_balancedness >= decision.staleness + 0.02
    assert status["appliedGeneration"] == 1  # the workers' and the operator's fields are left alone
    assert {c["type"] for c in status["conditions"]} == {"Applied", "Planned"}
    assert env.planned()["status"] == "True" and env.planned()["reason"] == "Rebalanced"
    assert [e["reason"] for e in env.events()] == ["Rebalanced"]
    assert env.counter("k2_eplb_rebalances_total") == 1
    assert env.counter("k2_eplb_moved_bytes_total") == moves * BYTES_PER_EXPERT
    assert env.metrics.value("k2_eplb_staleness", serving=NAME, namespace=env.namespace) == pytest.approx(
        decision.staleness
    )

    # Generation 2 is not applied yet: nothing is written, whatever the load says.
    env.now += 1000
    decision = env.reconcile(controller)
    assert decision.reason is Reason.APPLY_PENDING
    assert env.placement()["spec"]["generation"] == 2
    np.testing.assert_array_equal(env.slots(), new)
    planned = env.planned()
    assert (planned["status"], planned["reason"]) == ("False", "ApplyPending")
    assert planned["message"].startswith("previous generation 2 not yet applied")

    # Applied, but within the cooldown counted from the rebalance.
    env.mark_applied(2)
    env.now -= 1000 - 100
    decision = env.reconcile(controller)
    assert decision.reason is Reason.COOLDOWN
    assert env.planned()["message"] == "cooldown: 500s left"
    assert env.placement()["spec"]["generation"] == 2
    assert env.counter("k2_eplb_skipped_total", reason="Cooldown") == 1

    # The load drifts to other experts; once the cooldown is over, the controller follows it, again within budget.
    env.fake.set_placement(new)
    env.fake.set_profile(DRIFTED)
    time.sleep(WINDOW + 1)  # let the window hold the drifted load only
    env.now += 600
    decision = env.reconcile(controller)
    assert decision.reason is Reason.REBALANCED, decision.message
    assert env.placement()["spec"]["generation"] == 3
    assert 0 < count_moves(new, env.slots()) <= 4
    assert env.counter("k2_eplb_rebalances_total") == 2


@pytest.mark.prometheus
def test_stays_quiet_when_balanced(env: Env) -> None:
    env.create()
    env.fake.set_profile(BALANCED)
    env.fake.start()
    env.wait_for_window()
    decision = env.reconcile(env.controller())
    assert decision.reason is Reason.BELOW_MIN_IMPROVEMENT
    assert decision.staleness == pytest.approx(1.0, abs=0.02)
    assert env.placement()["spec"]["generation"] == 1
    np.testing.assert_array_equal(env.slots(), INITIAL)
    planned = env.planned()
    assert (planned["status"], planned["reason"]) == ("False", "BelowMinImprovement")
    assert planned["message"].startswith("predicted gain ")
    # The slot counters of the fake ranks give the measured balancedness.
    assert env.placement()["status"]["measuredBalancedness"] == pytest.approx(1.0, abs=0.02)
    assert env.events() == []


@pytest.mark.prometheus
def test_partial_metrics_change_nothing_and_say_why(env: Env) -> None:
    env.create()
    env.fake.set_profile(SKEWED)
    env.fake.start()
    env.wait_for_window()
    env.fake.ranks[2].down()
    assert env.prometheus is not None
    env.prometheus.wait_for(lambda: env.reporting_ranks() == RANKS - 1, what="the stopped rank going stale")
    decision = env.reconcile(env.controller())
    assert decision.reason is Reason.PARTIAL_METRICS
    assert env.placement()["spec"]["generation"] == 1
    np.testing.assert_array_equal(env.slots(), INITIAL)
    planned = env.planned()
    assert (planned["status"], planned["reason"]) == ("False", "PartialMetrics")
    assert planned["message"] == "partial metrics: 3/4 ranks reporting"
    events = env.events()
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "PartialMetrics")]
    assert env.counter("k2_eplb_skipped_total", reason="PartialMetrics") == 1


@pytest.mark.prometheus
def test_cli_once_rebalances(env: Env) -> None:
    env.create()
    env.fake.set_profile(SKEWED)
    env.fake.start()
    env.wait_for_window()
    argv = ["--once", "--namespace", env.namespace, "--kubeconfig", str(env.cluster.kubeconfig)]
    assert env.prometheus is not None
    assert controller_module.main([*argv, "--allowed-prometheus-url", env.prometheus.url]) == 0
    assert env.placement()["spec"]["generation"] == 2
    assert env.planned()["reason"] == "Rebalanced"


def test_direct_scrapes_without_prometheus(cluster: Any, k2_crds: list[str], namespace: str, fake: FakeServing) -> None:
    env = Env(cluster, namespace, fake, prometheus=None)
    env.create()
    fake.set_profile(SKEWED)
    controller = env.controller(endpoints=lambda serving: fake.urls)
    fake.advance(1.0)
    decision = env.reconcile(controller)
    assert decision.reason is Reason.TOO_FEW_SAMPLES  # one scrape: no increase yet
    assert env.placement()["spec"]["generation"] == 1
    fake.advance(WINDOW)
    decision = env.reconcile(controller)
    assert decision.reason is Reason.REBALANCED
    assert env.placement()["spec"]["generation"] == 2
    # A rank goes down: nothing changes, and the condition says why.
    env.mark_applied(2)
    env.now += 10_000
    fake.ranks[0].down()
    fake.advance(WINDOW)
    decision = env.reconcile(controller)
    assert decision.reason is Reason.PARTIAL_METRICS
    assert env.planned()["message"] == "partial metrics: 3/4 ranks reporting"
    assert env.placement()["spec"]["generation"] == 2


def test_cli_loop_serves_metrics_and_stops_on_sigterm(cluster: Any, k2_crds: list[str], namespace: str) -> None:
    manifest = serving_manifest(namespace, prometheus_url=None, enabled=False)
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    port = free_port()
    argv = [sys.executable, "-m", "k2_api.cli", "eplb", "run", "--namespace", namespace, "--interval", "0.5"]
    argv += ["--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--kubeconfig", str(cluster.kubeconfig)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sample = f'k2_eplb_skipped_total{{namespace="{namespace}",reason="Disabled",serving="{NAME}"}} '

    def passes(text: str) -> float:
        line = next((line for line in text.splitlines() if line.startswith(sample)), None)
        return float(line.removeprefix(sample)) if line else 0.0

    try:
        deadline = time.monotonic() + 30
        text = ""
        while passes(text) < 2:  # at least two passes over the disabled serving
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            assert (response.status, response.read()) == (200, b"ok\n")  # passes complete: alive
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert f'k2_eplb_rebalances_total{{namespace="{namespace}"' not in text  # a disabled serving is never planned
    assert f'k2_eplb_staleness{{namespace="{namespace}"' not in text


def test_rank_endpoints_come_from_running_pods_selected_by_the_serving(
    cluster: Any, k2_crds: list[str], namespace: str
) -> None:
    """Only lists pods: their IPs are fake and never contacted."""
    cluster.kubectl("apply", "-f", "-", input=json.dumps(serving_manifest(namespace, prometheus_url=None)))
    patch = json.dumps({"status": {"selector": "k2.ai/test-rank=k2"}})
    cluster.kubectl("patch", "k2serving", NAME, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)
    for name, labels, ports in [
        ("rank-0", {"k2.ai/test-rank": "k2"}, [{"name": "metrics", "containerPort": 9400}]),
        ("rank-1", {"k2.ai/test-rank": "k2"}, [{"name": "http", "containerPort": 8001}]),  # no metrics port
        ("other", {"k2.ai/test-rank": "other"}, [{"name": "metrics", "containerPort": 9400}]),
    ]:
        container = {"name": "main", "image": "registry.invalid/k2/worker:test", "ports": ports}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}}
        pod["spec"] = {"containers": [container]}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    kube = api.connect(cluster.kubeconfig)

    def pod_ip() -> str | None:
        out = cluster.kubectl("get", "pod", "rank-0", "-n", namespace, "-o", "json").stdout
        status = json.loads(out).get("status", {})
        return str(status["podIP"]) if status.get("phase") == "Running" and status.get("podIP") else None

    deadline = time.monotonic() + 60
    while (ip := pod_ip()) is None:
        assert time.monotonic() < deadline, "rank-0 did not get Running with a pod IP within 60s"
        time.sleep(0.5)
    (serving,) = api.list_servings(kube, namespace)
    assert api.rank_endpoints(kube, serving) == [f"http://{ip}:9400/metrics"]


def test_one_field_manager_owns_the_placement_spec_through_reshape_and_rebalance(
    cluster: Any, k2_crds: list[str], namespace: str
) -> None:
    """The operator creates the ExpertPlacement (on the controller's behalf), the controller reshapes it after the
    serving's ranks change and rebalances it under load; the operator's passes in between leave spec alone. After
    each write, `metadata.managedFields` names one manager of spec: k2-eplb. Operator and controller run in-process
    on the real adapter, against the real API server."""
    env = Env(
        cluster,
        namespace,
        FakeServing(NAME, num_layers=LAYERS, num_experts=EXPERTS, num_ranks=2, slots=5, tokens_per_s=4000),
        prometheus=None,
    )
    operator = AsyncKube(connect(cluster.kubeconfig, field_manager=FieldManagers.OPERATOR))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(serving_manifest(namespace, prometheus_url=None)))

    def operator_pass() -> None:
        asyncio.run(serving_reconcile(operator, namespace, NAME))

    def spec_managers() -> set[str]:
        body = env.kube.get(ExpertPlacement.KIND, namespace, NAME)  # kubectl get hides managedFields
        assert body is not None
        return field_managers(body)

    operator_pass()
    assert env.placement()["spec"]["ranks"] == RANKS and spec_managers() == {FieldManagers.EPLB}

    # The serving's ranks change: the operator leaves spec as it is, the controller reshapes it.
    patch = json.dumps({"spec": {"ranksPerGroup": 2}})
    cluster.kubectl("patch", "k2serving", NAME, "-n", namespace, "--type=merge", "-p", patch)
    operator_pass()
    assert env.placement()["spec"]["generation"] == 1
    controller = env.controller(endpoints=lambda serving: env.fake.urls)
    decision = env.reconcile(controller)
    assert decision.reason is Reason.RESHAPED
    spec = env.placement()["spec"]
    assert (spec["ranks"], spec["slotsPerRank"], spec["generation"]) == (2, 5, 2)
    assert spec["reason"].startswith("reshape: generation 2")
    assert spec_managers() == {FieldManagers.EPLB}
    operator_pass()
    assert env.placement()["spec"]["generation"] == 2 and spec_managers() == {FieldManagers.EPLB}

    # The ranks apply generation 2 and report a skewed load: the controller rebalances.
    env.mark_applied(2)
    env.now += 10_000  # past the cooldown that the reshape started
    try:
        env.fake.set_placement(env.slots())
        env.fake.set_profile(SKEWED)
        env.fake.advance(1.0)
        assert env.reconcile(controller).reason is Reason.TOO_FEW_SAMPLES
        env.fake.advance(WINDOW)
        decision = env.reconcile(controller)
    finally:
        env.fake.stop()
    assert decision.reason is Reason.REBALANCED, decision.message
    assert env.placement()["spec"]["generation"] == 3
    assert spec_managers() == {FieldManagers.EPLB}
    operator_pass()
    assert env.placement()["spec"]["generation"] == 3 and spec_managers() == {FieldManagers.EPLB}


def test_rounds_one_generation_at_a_time_with_the_plan_in_status(
    cluster: Any, k2_crds: list[str], namespace: str, fake: FakeServing
) -> None:
    """A budget of one copy cannot reach the target: the controller writes round 1, waits until every rank applied
    it and a cooldown of cooldownSeconds / rounds passed, then writes round 2; status.rebalancePlan, kept by the real
    API server under the controller's field manager, shows the progress."""
    env = Env(cluster, namespace, fake, prometheus=None)
    env.create(maxMoves=1)
    fake.set_profile(SKEWED)
    controller = env.controller(endpoints=lambda serving: fake.urls)
    fake.advance(1.0)
    assert env.reconcile(controller).reason is Reason.TOO_FEW_SAMPLES
    fake.advance(WINDOW)
    first = env.reconcile(controller)
    assert first.reason is Reason.REBALANCED, first.message
    assert first.plan is not None and first.plan.rounds >= 2
    rounds = first.plan.rounds
    body = env.placement()
    assert body["spec"]["generation"] == 2 and count_moves(INITIAL, env.slots()) == 1
    assert body["status"]["rebalancePlan"] == {
        "round": 1,
        "rounds": rounds,
        "generation": 2,
        "predictedBalancedness": pytest.approx(first.plan.predicted_balancedness),
        "targetBalancedness": pytest.approx(first.plan.target_balancedness),
        "movesPerRound": 1,
    }
    stored = env.kube.get(ExpertPlacement.KIND, namespace, NAME)
    assert stored is not None
    owners = {e["manager"] for e in stored["metadata"]["managedFields"] if "f:rebalancePlan" in str(e["fieldsV1"])}
    assert owners == {FieldManagers.EPLB}

    round_one = env.slots()
    fake.set_placement(round_one)
    fake.advance(WINDOW)
    written_at = env.now
    env.now += 600  # past any cooldown: only the apply gate holds the next round back
    assert env.reconcile(controller).reason is Reason.APPLY_PENDING
    env.mark_applied(2)
    env.now = written_at + math.ceil(600 / rounds) - 2
    waiting = env.reconcile(controller)
    assert waiting.reason is Reason.COOLDOWN and waiting.message.endswith(f"s left before round 2 of {rounds}")
    env.now = written_at + math.ceil(600 / rounds)  # cooldownSeconds / rounds after round 1
    fake.advance(WINDOW)
    second = env.reconcile(controller)
    assert second.reason is Reason.REBALANCED, second.message
    body = env.placement()
    assert body["spec"]["generation"] == 3 and count_moves(round_one, env.slots()) == 1
    plan = body["status"]["rebalancePlan"]
    assert (plan["round"], plan["generation"]) == (2, 3)
    assert second.predicted_balancedness is not None and first.predicted_balancedness is not None
    assert second.predicted_balancedness > first.predicted_balancedness
