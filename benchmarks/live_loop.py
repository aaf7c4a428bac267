"""The live loop, measured: request latency while the EPLB controller rebalances against steady state, the time from a
new placement generation to every rank running it, and the expert bytes each rebalance moved, from peers and from
storage.

Runs on the local cluster of `make cluster-up` (its real node and its Prometheus), inside the live-loop setup of the
e2e tests (hack/liveloop/session.py: the chart, a K2Serving of 2 x 2 k2-debug ranks on a claim-held checkpoint, the
frontend forwarded to 127.0.0.1). Each phase of traffic repeats the byte the placement in force serves worst
(liveloop.skew), one phase per rebalance. A
request is "during a rebalance" when it ran at any moment between a generation's write and the moment every rank
reported it, plus two seconds; every other request is steady state. Latency is the client's, through the frontend.

    python benchmarks/live_loop.py                      # 3 rebalances
    python benchmarks/live_loop.py --rebalances 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HACK = Path(__file__).resolve().parents[1] / "hack"
sys.path.insert(0, str(HACK))

from liveloop.kubectl import Kubectl  # noqa: E402
from liveloop.rebalance import Rebalance, observe_rebalance  # noqa: E402
from liveloop.session import live_setup  # noqa: E402
from liveloop.skew import Phases  # noqa: E402
from liveloop.traffic import Outcome, Tally, Traffic  # noqa: E402
from localcluster.layout import DEFAULT_DIR, Layout, State  # noqa: E402

WINDOW_S = 20
COOLDOWN_S = 75  # as in e2e/test_live_loop.py: each placement planned on and measured against one phase only
SETTLE_S = 2.0


def during(outcome: Outcome, rebalances: list[Rebalance]) -> bool:
    end = outcome.started + outcome.seconds
    return any(outcome.started <= r.applied_at + SETTLE_S and end >= r.written_at for r in rebalances)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebalances", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    layout = Layout(DEFAULT_DIR.resolve())
    state = State.load(layout)
    if state is None or not state.prometheus_url or not state.prometheus_pod_url:
        print("needs `make cluster-up` (the real node and its Prometheus)")
        return 2
    tools = layout.root.parent / ".tools" / "bin"
    kubectl = Kubectl(layout.root / "kubeconfig", tools / "kubectl", tools / "helm")
    with live_setup(
        kubectl,
        {"type": "real"},
        state.prometheus_url,
        state.prometheus_pod_url,
        eplb_window_s=WINDOW_S,
        eplb_cooldown_s=COOLDOWN_S,
    ) as live:
        phases = Phases(live.prompt_loads)
        placement = live.placement()
        phase = [phases.next(placement)]
        rebalances: list[Rebalance] = []
        generation = int(placement["spec"]["generation"])
        with Traffic(live.url, lambda: phase[0], concurrency=args.concurrency) as traffic:
            for index in range(args.rebalances):
                if index:
                    phase[0] = phases.next(live.placement())
                rebalance = observe_rebalance(live, generation, WINDOW_S)
                print(rebalance, flush=True)
                rebalances.append(rebalance)
                generation = rebalance.generation
            outcomes = traffic.stop()
    steady = Tally.of([o for o in outcomes if not during(o, rebalances)])
    moving = Tally.of([o for o in outcomes if during(o, rebalances)])
    print(f"\nrequests: {Tally.of(outcomes)} (concurrency {args.concurrency})")
    print(f"steady state:      {steady}")
    print(f"during rebalances: {moving}")
    p50, p99 = moving.p50_s / steady.p50_s, moving.p99_s / steady.p99_s
    print(f"p50 ratio {p50:.2f}, p99 ratio {p99:.2f} (during rebalances / steady state)")
    applies = sorted(r.apply_seconds for r in rebalances)
    print(f"new generation -> every rank applied: {', '.join(f'{s:.1f}' for s in applies)} s")
    for r in rebalances:
        print(
            f"generation {r.generation}: {r.peer_bytes:.0f} bytes from peers, {r.storage_bytes:.0f} from storage; "
            f"balancedness {r.before:.3f} -> {r.after:.3f}"
        )
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
