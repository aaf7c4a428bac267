"""The live loop on pods that run our image: the chart's operator and EPLB controller, a K2Serving of 2 groups x 2
ranks loading a checkpoint from a PersistentVolumeClaim, skewed traffic through the frontend Service, Prometheus
discovering the ranks, and rebalances applied live, with every request accounted for.

One module-scoped setup (hack/liveloop/session.py) serves the three tests, in order: the rebalances, a rolling
update, a rank's death. Each prints its request accounting. On the local cluster this runs on the real node
(`make test`); on another cluster (kind) set K2_E2E_KUBECONFIG and the K2_E2E_PROMETHEUS_* variables
(e2e/conftest.py)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2e.conftest import LiveEnv
from k2_api.contract import FieldManagers
from liveloop.kubectl import KubectlError
from liveloop.rebalance import Rebalance, observe_rebalance
from liveloop.session import Live, live_setup
from liveloop.skew import Phases
from liveloop.system import wait_for
from liveloop.traffic import Outcome, Tally, Traffic, generate

# The module's setup (checkpoint upload, chart, four ranks loading) runs inside the first test's time limit.
pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(1800)]

# Each phase's traffic repeats one byte, so every token of a phase takes the same experts: a clearly skewed load.
# Each phase takes the prompt the placement in force serves worst (liveloop.skew), so each needs a placement of its
# own: three phases, three rebalances.
PHASES = 3
STEADY = "Kimi K2 routes every token to 8 of its 384 experts; "
PROBE = "The quick brown fox jumps over the lazy dog."
PROBE_TOKENS = 16
WINDOW_S = 20
# Longer than a rebalance's apply, the window after it and the next window: each placement is planned on, and
# measured against, one phase's traffic only (rebalance.py measures before and after one window each).
COOLDOWN_S = 75
ROLL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def live(live_env: LiveEnv) -> Iterator[Live]:
    with live_setup(
        live_env.kubectl,
        live_env.node_selector,
        live_env.prometheus_url,
        live_env.prometheus_pod_url,
        eplb_window_s=WINDOW_S,
        eplb_cooldown_s=COOLDOWN_S,
    ) as setup:
        yield setup


def report(what: str, outcomes: list[Outcome]) -> Tally:
    tally = Tally.of(outcomes)
    print(f"{what}: {len(outcomes)} requests: {tally}")
    for failure in [o for o in outcomes if not o.ok][:10]:
        print(f"  failed: status {failure.status}: {failure.error}")
    return tally


def probe(live: Live) -> Outcome:
    outcome = generate(live.url + "/v1/generate", PROBE, PROBE_TOKENS, 120)
    assert outcome.ok, outcome.error
    return outcome


def test_skewed_traffic_is_rebalanced_live_three_times_with_zero_failed_requests(live: Live) -> None:
    before = probe(live)
    # The probe's tokens leave the window before the skewed traffic starts, so that the first placement is planned
    # on (and its balancedness before measured over) that phase's traffic alone.
    time.sleep(WINDOW_S + 6)
    phases = Phases(live.prompt_loads)
    placement = live.placement()
    phase = [phases.next(placement)]
    rebalances: list[Rebalance] = []
    generation = int(placement["spec"]["generation"])
    with Traffic(live.url, lambda: phase[0]) as traffic:
        for index in range(PHASES):
            if index:
                phase[0] = phases.next(live.placement())
            prompt = phase[0]
            rebalance = observe_rebalance(live, generation, WINDOW_S)
            print(f"phase {index + 1} (prompts of {prompt[0]!r}, skew {rebalance.skew:.1f}x): {rebalance}")
            print("  per-GPU load after:\n    " + "\n    ".join(rebalance.loads_after))
            rebalances.append(rebalance)
            generation = rebalance.generation
        outcomes = traffic.stop()
    after = probe(live)
    tally = report("live loop", outcomes)
    print(f"probe under generation {before.generation}: {before.tokens}")
    print(f"probe under generation {after.generation}: {after.tokens}")
    assert tally.failed == 0 and tally.ok > 0
    assert len(rebalances) == 3
    for r in rebalances:
        assert r.spec_managers == {FieldManagers.EPLB}, r  # the controller wrote it, nobody else
        assert r.after > r.before, r
        assert r.peer_bytes > 0 and r.storage_bytes == 0, r  # every expert moved came from a peer
    served = {o.generation for o in outcomes}
    assert {r.generation for r in rebalances} <= served, served
    assert after.generation == rebalances[-1].generation
    assert after.tokens == before.tokens


class ReadyGroupsWatch:
    """Samples the serving's ready groups every second in the background: the fewest seen is what a rollout or a
    failure left serving. It also keeps each change of the rank pods (name, uid, address, ready, terminating), so
    that a failed request can be read against what the pods were doing then (`timeline`)."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.samples: list[int] = []
        self.changes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = ""
        while not self._stop.wait(1.0):
            try:
                self.samples.append(int(self.live.serving.status(self.live.kubectl).get("readyGroups", 0)))
                pods = "; ".join(sorted(pod_line(p) for p in self.live.rank_pods()))
            except (KubectlError, subprocess.TimeoutExpired):  # a kubectl hiccup is not a sample
                continue
            if pods != last:
                self.changes.append((time.time(), pods))
                last = pods

    def timeline(self, outcomes: list[Outcome], slow_s: float = 5.0) -> str:
        """The pod changes and the requests that failed or took longer than `slow_s`, in time order."""
        events = [(at, f"pods: {pods}") for at, pods in self.changes]
        events += [
            (o.started, f"request took {o.seconds:.1f} s: " + ("ok" if o.ok else f"failed: {o.error}"))
            for o in outcomes
            if not o.ok or o.seconds > slow_s
        ]
        start = min(at for at, _ in events) if events else 0.0
        return "\n".join(f"  +{at - start:6.1f}s {line}" for at, line in sorted(events))

    def __enter__(self) -> ReadyGroupsWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def pod_line(pod: dict[str, Any]) -> str:
    """`g0-0 1a2b3c4d 10.88.0.7 ready` (or `not-ready`, `terminating`) of a rank pod."""
    meta, status = pod["metadata"], pod.get("status", {})
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    state = "terminating" if meta.get("deletionTimestamp") else "ready" if ready else "not-ready"
    name = meta["name"].removeprefix(meta["labels"]["app.kubernetes.io/instance"] + "-")
    return f"{name} {meta['uid'][:8]} {status.get('podIP', '-')} {state}"


def rank_pod_uids(live: Live) -> dict[str, tuple[str, int]]:
    """pod name -> (uid, group) of the serving's rank pods."""
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], int(p["metadata"]["labels"]["k2.ai/group"]))
        for p in live.rank_pods()
    }


def all_ready_again(live: Live, old_uids: set[str], groups: set[int]) -> bool:
    """Every rank pod of `groups` is new (not in `old_uids`) and the whole serving is ready on one generation."""
    pods = live.rank_pods()
    replaced = all(
        p["metadata"]["uid"] not in old_uids for p in pods if int(p["metadata"]["labels"]["k2.ai/group"]) in groups
    )
    return replaced and live.serving.ready(live.kubectl)


def test_a_model_change_rolls_the_groups_one_at_a_time_with_zero_failed_requests(live: Live) -> None:
    before = probe(live)
    old = rank_pod_uids(live)
    body: dict[str, Any] = live.serving.manifest()
    body["spec"]["model"]["checkpointUri"] = live.second_model_uri
    with Traffic(live.url, lambda: STEADY) as traffic, ReadyGroupsWatch(live) as watch:
        time.sleep(5)
        live.kubectl.apply(body, live.namespace)
        wait_for(
            "every group rolled to the new model",
            lambda: (
                all_ready_again(live, {uid for uid, _ in old.values()}, {0, 1})
                and live.serving.status(live.kubectl).get("updatedGroups") == 2
            ),
            ROLL_TIMEOUT_S,
            every_s=2,
        )
        time.sleep(5)
        outcomes = traffic.stop()
    tally = report("rolling update", outcomes)
    print(f"ready groups during the rollout: min {min(watch.samples)}, samples {len(watch.samples)}")
    print(watch.timeline(outcomes))
    assert tally.failed == 0 and tally.ok > 0
    assert min(watch.samples) == 1, watch.samples  # one group at a time: never both down, and each one rolled
    assert probe(live).tokens == before.tokens  # the same weights, read from the other path


def test_a_deleted_rank_pod_re_forms_its_group_while_the_other_serves_with_zero_failed_requests(live: Live) -> None:
    old = rank_pod_uids(live)
    victim = next(name for name, (_, group) in sorted(old.items()) if group == 1 and not name.endswith("-0"))
    with Traffic(live.url, lambda: STEADY) as traffic, ReadyGroupsWatch(live) as watch:
        time.sleep(5)
        live.kubectl.run("delete", "pod", victim, f"--namespace={live.namespace}", "--wait=false")
        wait_for(
            "group 1 re-formed as a gang",
            lambda: all_ready_again(live, {uid for uid, g in old.values() if g == 1}, {1}),
            ROLL_TIMEOUT_S,
            every_s=2,
        )
        time.sleep(5)
        outcomes = traffic.stop()
    tally = report(f"rank death ({victim})", outcomes)
    survivors = {name for name, (uid, _) in old.items() if uid in {p["metadata"]["uid"] for p in live.rank_pods()}}
    print(f"ready groups meanwhile: min {min(watch.samples)}; group 0 pods kept: {sorted(survivors)}")
    print(watch.timeline(outcomes))
    assert tally.failed == 0 and tally.ok > 0
    assert survivors == {name for name, (_, g) in old.items() if g == 0}  # group 0 was never restarted
    assert min(watch.samples) >= 1, watch.samples
