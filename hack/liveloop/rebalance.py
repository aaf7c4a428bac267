"""One rebalance, observed from outside: the skew shows in Prometheus, the EPLB controller writes a new generation
(the first round of its plan, and the others one after another once each is applied: ExpertPlacement
status.rebalancePlan), every rank applies it, and a window after the last round Prometheus shows the balancedness
before and after and the expert bytes the ranks took in, by source."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from k2_api.contract import Annotations, WeightSources
from liveloop.observe import bars
from liveloop.session import Live
from liveloop.system import wait_for

SKEW = 2.0
"""Hottest expert / mean expert tokens in some layer: the load counts as clearly skewed from here."""


@dataclass(frozen=True)
class Rebalance:
    generation: int
    """The plan's last round."""
    rounds: int
    spec_managers: frozenset[str]
    """Field managers of the placement's spec: the EPLB controller alone."""
    skew: float
    written_at: float
    """When the first round was written."""
    applied_at: float
    """When every rank had applied the first round."""
    before: float
    after: float
    peer_bytes: float
    storage_bytes: float
    loads_after: tuple[str, ...]

    @property
    def apply_seconds(self) -> float:
        return self.applied_at - self.written_at

    def __str__(self) -> str:
        rounds = f" (the last of {self.rounds} rounds)" if self.rounds > 1 else ""
        return (
            f"generation {self.generation}{rounds}: balancedness {self.before:.3f} -> {self.after:.3f}, applied by "
            f"every rank {self.apply_seconds:.1f} s after its first round was written, expert bytes in: "
            f"{self.peer_bytes:.0f} from peers, {self.storage_bytes:.0f} from storage"
        )


def rfc3339_seconds(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def plan_finished(placement: dict[str, Any], generation: int) -> bool:
    """Whether `generation` is its plan's last round: status.rebalancePlan says so (a plan cut short says so too,
    once the controller has found that its next round gains too little), or there is no plan of it."""
    plan = placement.get("status", {}).get("rebalancePlan")
    if plan is None or plan.get("generation") != generation:
        return True
    return bool(plan["round"] >= plan["rounds"])


def observe_rebalance(live: Live, previous: int, window_s: int, timeout_s: float = 240.0) -> Rebalance:
    """Waits for the next generation after `previous`, and the rounds after it until its plan is done, and measures
    them (the traffic must be running).

    Balancedness before: over the window that ended when the first round was written; after: over the window that
    ends one window after every rank applied the last. Both see one traffic phase and one placement only when the
    serving's cooldown outlasts the apply, the wait here and the next phase's first window."""
    ranks = live.serving.groups * live.serving.ranks
    skew = wait_for(
        "expert load skew in Prometheus",
        lambda: (s := live.series.expert_skew(window_s)) is not None and s >= SKEW and s,
        timeout_s,
    )
    bytes_before = live.series.weight_bytes()
    placement = wait_for(
        f"a generation after {previous}",
        lambda: (p := live.placement())["spec"]["generation"] > previous and p,
        timeout_s,
    )
    generation = int(placement["spec"]["generation"])
    written_at = rfc3339_seconds(placement["metadata"]["annotations"][Annotations.REBALANCED_AT])

    def applied_everywhere() -> dict[str, Any] | None:
        status: dict[str, Any] = live.placement().get("status", {})
        reports = status.get("ranks", [])
        everywhere = len(reports) == ranks and all(r.get("generation") == generation for r in reports)
        return status if everywhere and status.get("appliedGeneration") == generation else None

    def next_round() -> dict[str, Any] | None:
        """The placement once its plan is done at `generation`, or has written its next round."""
        placement = live.placement()
        moved_on = placement["spec"]["generation"] > generation
        return placement if moved_on or plan_finished(placement, generation) else None

    rounds, applied_at = 1, None
    while True:
        wait_for(f"every rank on generation {generation}", applied_everywhere, timeout_s, every_s=0.5)
        applied_at = applied_at or time.time()  # the first round's: how long one generation takes to apply
        placement = wait_for(f"the plan's next round after generation {generation}", next_round, timeout_s)
        if placement["spec"]["generation"] == generation:
            break
        generation, rounds = int(placement["spec"]["generation"]), rounds + 1
    fields = live.kubectl.get(f"expertplacement/{live.serving.name}", "--show-managed-fields", namespace=live.namespace)
    managers = frozenset(
        entry["manager"]
        for entry in fields["metadata"].get("managedFields", [])
        if "f:spec" in entry.get("fieldsV1", {})
    )
    time.sleep(window_s + 6)  # a whole window of traffic under the new placement, and one more scrape
    before = live.series.balancedness(window_s, at=written_at)
    after = live.series.balancedness(window_s)
    assert before is not None and after is not None, "Prometheus has no slot load for the serving"
    bytes_after = live.series.weight_bytes()
    moved = {s: bytes_after.get(s, 0.0) - bytes_before.get(s, 0.0) for s in WeightSources.ALL}
    return Rebalance(
        generation=generation,
        rounds=rounds,
        spec_managers=managers,
        skew=skew,
        written_at=written_at,
        applied_at=applied_at,
        before=before,
        after=after,
        peer_bytes=moved[WeightSources.PEER],
        storage_bytes=moved[WeightSources.STORAGE],
        loads_after=tuple(bars(live.series.gpu_loads(window_s))),
    )
