"""The live loop on pods that run our image: the chart's operator and EPLB controller, a K2Serving of 2 groups x 2
ranks loading a checkpoint from a PersistentVolumeClaim, skewed traffic through the frontend Service, Prometheus
discovering the ranks, and rebalances applied live, with every request accounted for.

One module-scoped setup serves the three tests, in order: the rebalances, a rolling update, a rank's death. Each
prints its request accounting. On the local cluster this runs on the real node (`make test`); on another cluster
(kind) set K2_E2E_KUBECONFIG and the K2_E2E_PROMETHEUS_* variables (e2e/conftest.py)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from e2e.conftest import LiveEnv
from k2_api.contract import Annotations, WeightSources
from k2_workers.model import K2Config, K2ForCausalLM, save_pretrained
from liveloop.checkpoint import upload
from liveloop.observe import Prometheus, ServingSeries, bars
from liveloop.system import Chart, Image, Serving, wait_for
from liveloop.traffic import Outcome, Tally, Traffic, generate

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# Each phase's traffic repeats one byte, so every token of a phase takes the same experts: a clearly skewed load.
# The two prompts' hot experts differ, so each phase needs a placement of its own (three rebalances in all).
PHASES = ("z" * 160, "a" * 160, "z" * 160)
PROBE = "The quick brown fox jumps over the lazy dog."
PROBE_TOKENS = 16
WINDOW_S = 20
# A pod's first start on a loaded 2-core machine (torch import, checkpoint read, gloo rendezvous) takes 30-120 s.
READY_TIMEOUT_S = 480
REBALANCE_TIMEOUT_S = 240


@dataclass
class Live:
    env: LiveEnv
    namespace: str
    serving: Serving
    series: ServingSeries
    url: str
    second_model_uri: str

    @property
    def kubectl(self) -> Any:
        return self.env.kubectl

    def placement(self) -> dict[str, Any]:
        return self.serving.placement(self.kubectl)

    def rank_pods(self) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={self.serving.name},app.kubernetes.io/component=rank"
        pods: list[dict[str, Any]] = self.kubectl.get("pods", f"--selector={selector}", namespace=self.namespace)[
            "items"
        ]
        return pods


def write_checkpoint(directory: Path) -> Path:
    """A k2-debug checkpoint with fixed random weights (seed 0)."""
    torch.manual_seed(0)
    save_pretrained(K2ForCausalLM(K2Config.from_preset("k2-debug")).eval(), directory)
    return directory


@pytest.fixture(scope="module")
def live(live_env: LiveEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    kubectl, nodes = live_env.kubectl, live_env.node_selector
    namespace = f"k2-live-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", namespace)
    image = Image()
    chart = Chart(f"k2-{namespace}", namespace, image, nodes, prometheus_url=live_env.prometheus_pod_url)
    try:
        checkpoint = write_checkpoint(tmp_path_factory.mktemp("k2-debug"))
        model_uri = upload(kubectl, namespace, checkpoint, "models", "k2-debug", image, nodes)
        second_uri = upload(kubectl, namespace, checkpoint, "models", "k2-debug-copy", image, nodes)
        chart.install(kubectl)
        serving = Serving("k2-live", namespace, image, checkpoint_uri=model_uri, node_selector=nodes)
        serving.apply(kubectl)
        wait_for("the serving ready on every rank", lambda: serving.ready(kubectl), READY_TIMEOUT_S, every_s=2)
        series = ServingSeries(Prometheus(live_env.prometheus_url), serving.name, namespace)
        with kubectl.port_forward(namespace, serving.frontend_service(), 8000) as port:
            yield Live(live_env, namespace, serving, series, f"http://127.0.0.1:{port}", second_uri)
    finally:
        try:
            chart.uninstall(kubectl)
        finally:
            kubectl.run("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")


def rfc3339_seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def report(what: str, outcomes: list[Outcome]) -> Tally:
    tally = Tally.of(outcomes)
    print(f"{what}: {len(outcomes)} requests: {tally}")
    for failure in [o for o in outcomes if not o.ok][:10]:
        print(f"  failed: status {failure.status}: {failure.error}")
    return tally


@dataclass(frozen=True)
class Rebalance:
    generation: int
    written_at: float
    applied_at: float
    before: float
    after: float
    peer_bytes: float
    storage_bytes: float


def rebalance_once(live: Live, previous: int) -> Rebalance:
    """Waits for the skew in Prometheus, for the controller's next generation, and for every rank to apply it;
    then measures balancedness before and after from Prometheus, and the expert bytes the ranks took in."""
    skew = wait_for(
        "expert load skew in Prometheus",
        lambda: (s := live.series.expert_skew(WINDOW_S)) is not None and s >= 2.0 and s,
        REBALANCE_TIMEOUT_S,
    )
    print(f"  skew in Prometheus: hottest expert {skew:.1f}x the mean")
    bytes_before = live.series.weight_bytes()
    placement = wait_for(
        f"a generation after {previous}",
        lambda: (p := live.placement())["spec"]["generation"] > previous and p,
        REBALANCE_TIMEOUT_S,
    )
    generation = int(placement["spec"]["generation"])
    written_at = rfc3339_seconds(placement["metadata"]["annotations"][Annotations.REBALANCED_AT])
    managers = {entry["manager"] for entry in placement["metadata"]["managedFields"] if "f:spec" in entry["fieldsV1"]}
    assert managers == {"k2-eplb"}, managers

    def applied_everywhere() -> dict[str, Any] | None:
        status: dict[str, Any] = live.placement().get("status", {})
        ranks = status.get("ranks", [])
        everywhere = len(ranks) == 4 and all(r.get("generation") == generation for r in ranks)
        return status if everywhere and status.get("appliedGeneration") == generation else None

    status = wait_for(f"every rank on generation {generation}", applied_everywhere, REBALANCE_TIMEOUT_S)
    applied_at = time.time()
    print(f"  generation {generation}: written, applied by {[r['pod'] for r in status['ranks']]}")
    time.sleep(WINDOW_S + 6)  # a whole window of traffic under the new placement, and one more scrape
    before = live.series.balancedness(WINDOW_S, at=written_at)
    after = live.series.balancedness(WINDOW_S)
    bytes_after = live.series.weight_bytes()
    assert before is not None and after is not None
    moved = {s: bytes_after.get(s, 0.0) - bytes_before.get(s, 0.0) for s in WeightSources.ALL}
    print(f"  balancedness from Prometheus: {before:.3f} before, {after:.3f} after")
    print("  per-GPU load after:\n    " + "\n    ".join(bars(live.series.gpu_loads(WINDOW_S))))
    return Rebalance(
        generation,
        written_at,
        applied_at,
        before,
        after,
        moved[WeightSources.PEER],
        moved[WeightSources.STORAGE],
    )


def test_skewed_traffic_is_rebalanced_live_three_times_with_zero_failed_requests(live: Live) -> None:
    probe_before = generate(live.url + "/v1/generate", PROBE, PROBE_TOKENS, 120)
    assert probe_before.ok, probe_before.error
    phase = [PHASES[0]]
    rebalances: list[Rebalance] = []
    generation = int(live.placement()["spec"]["generation"])
    with Traffic(live.url, lambda: phase[0]) as traffic:
        for index, prompt in enumerate(PHASES):
            phase[0] = prompt
            print(f"phase {index + 1}: prompts of {prompt[0]!r}")
            rebalance = rebalance_once(live, generation)
            rebalances.append(rebalance)
            generation = rebalance.generation
        outcomes = traffic.stop()
    probe_after = generate(live.url + "/v1/generate", PROBE, PROBE_TOKENS, 120)
    tally = report("live loop", outcomes)
    print(f"probe before (generation {probe_before.generation}): {probe_before.tokens}")
    print(f"probe after  (generation {probe_after.generation}): {probe_after.tokens}")
    for r in rebalances:
        print(
            f"generation {r.generation}: balancedness {r.before:.3f} -> {r.after:.3f}, applied "
            f"{r.applied_at - r.written_at:.1f}s after it was written, {r.peer_bytes:.0f} bytes from peers, "
            f"{r.storage_bytes:.0f} from storage"
        )
    assert tally.failed == 0 and tally.ok > 0
    assert len(rebalances) == 3
    for r in rebalances:
        assert r.after > r.before, r
        assert r.peer_bytes > 0 and r.storage_bytes == 0, r
    # Requests were served under every generation, and the greedy probe is the same under the last one.
    served = {o.generation for o in outcomes}
    assert {r.generation for r in rebalances} <= served, served
    assert probe_after.ok and probe_after.generation == rebalances[-1].generation
    assert probe_after.tokens == probe_before.tokens
