"""EPLB on Ray: the Kubernetes EPLB controller's decision path without Kubernetes.

Each pass the driver gives `EplbLoop.step` the ranks' /metrics URLs and the placement generation each rank reports;
the loop scrapes the ranks' load counters directly (`k2_eplb.scrape_reader`), plans with the controller's planner and
solver (`k2_eplb.planner.plan`, its policy from spec.eplb by `k2_eplb.convert.policy_from_spec`), and keeps what the
ExpertPlacement and its status hold on Kubernetes: the placement in force and its generation, the generation every
rank applied, the time of the last rebalance (cooldown) and the plan in rounds. A decision that writes a generation
becomes the placement file the ranks' `--placement` reads (the controller's spec, `convert.spec_of`); the driver hands
it to each group's rank 0, which applies it live with the peer-to-peer moves, as in pods.

Generation 1 is what the operator starts a serving with: the solver on uniform load.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from k2_api import ExpertPlacementSpec, K2Serving
from k2_api.contract import MetricLabels, Metrics, WeightSources
from k2_eplb import convert
from k2_eplb.load import LoadReadError, LoadSample
from k2_eplb.planner import Decision, IntArray, PlacementState, Reason, Shape, plan
from k2_eplb.rounds import Progress
from k2_eplb.scrape_reader import Fetch, ScrapeLoadReader, http_get_text
from k2_eplb.solver import solve

INITIAL_REASON = "initial: uniform load"


@dataclass(frozen=True)
class RankReport:
    """What one rank says on /healthz: the placement generation it runs (None: not answering or none yet)."""

    group: int
    rank: int
    generation: int | None

    @property
    def name(self) -> str:
        return f"group {self.group} rank {self.rank}"


def initial_decision(shape: Shape) -> Decision:
    """Generation 1: the solver on uniform load, the placement the operator gives a new serving."""
    uniform_LE = np.ones((shape.num_layers, shape.num_experts))
    placement_LGS = np.asarray(solve(uniform_LE, shape.ranks, shape.slots_per_rank), dtype=np.int64)
    return Decision(Reason.RESHAPED, INITIAL_REASON, placement_LGS=placement_LGS, generation=1)


def placement_file(decision: Decision, shape: Shape) -> str:
    """The placement file (`k2_workers.serve.placement.read_placement`'s format) of a decision that writes a
    generation: the ExpertPlacement spec the controller would write, checked by the API model."""
    spec = ExpertPlacementSpec.model_validate(convert.spec_of(decision, shape))
    return json.dumps(spec.to_dict(), separators=(",", ":"))


def applied_generation(reports: Sequence[RankReport], generation: int, previous: int | None) -> int | None:
    """The generation every rank runs: `generation` once all report it, else the one every rank ran before
    (as the operator writes ExpertPlacement status.appliedGeneration)."""
    everywhere = bool(reports) and all(r.generation == generation for r in reports)
    return generation if everywhere else previous


def ranks_behind(reports: Sequence[RankReport], generation: int) -> tuple[str, ...]:
    """The ranks that report no generation or one older than `generation`."""
    return tuple(r.name for r in reports if r.generation is None or r.generation < generation)


def weight_bytes(pages: Iterable[str]) -> dict[str, float]:
    """Expert-weight bytes the ranks took in to apply placements, by source (`WeightSources`), summed over their
    /metrics pages."""
    found = dict.fromkeys(WeightSources.ALL, 0.0)
    for page in pages:
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                source = sample.labels.get(MetricLabels.SOURCE, "")
                if sample.name == Metrics.EXPERT_WEIGHT_BYTES.name and source in found:
                    found[source] += sample.value
    return found


class RecordingFetch:
    """The scrape reader's fetch, keeping each endpoint's newest page for what the reader does not read."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self.pages: dict[str, str] = {}

    def __call__(self, url: str, timeout: float) -> str:
        self.pages[url] = text = self._fetch(url, timeout)
        return text


def window_start(scrapes: Sequence[float], now: float, window_seconds: float) -> float | None:
    """Where the scrape reader's window starts: the newest scrape at least a window old, else the oldest."""
    old = [t for t in scrapes if t <= now - window_seconds]
    return max(old) if old else min(scrapes, default=None)


@dataclass
class Pass:
    """One pass of the loop: the planner's decision, and what the summary shows."""

    decision: Decision
    generation: int
    """The generation in force after the pass."""
    applied_generation: int | None
    ranks_behind: tuple[str, ...]
    measured_generation: int | None
    """The generation every rank ran during the whole window of `decision.measured_balancedness` (None: the window
    saw a change of placement, or no generation was applied everywhere before it started)."""
    weight_bytes: dict[str, float] = field(default_factory=dict)
    """Expert-weight bytes the ranks reporting now took in since they started, by source."""


@dataclass
class EplbLoop:
    """The EPLB state of one serving on Ray, planned on by `step`."""

    serving: K2Serving
    clock: Callable[[], float] = time.monotonic
    fetch: Fetch = http_get_text
    """How the scrape reader GETs a /metrics page."""
    placement_LGS: IntArray = field(init=False)
    generation: int = field(init=False)
    document: str = field(init=False)
    """The placement file of `generation`."""
    applied: int | None = None
    last_rebalance_time: float | None = None
    plan: Progress | None = None
    rebalances: int = 0
    moved_experts: int = 0
    """Expert copies moved by every rebalance so far."""
    _applied_at: dict[int, float] = field(default_factory=dict)
    _scrapes: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        spec = self.serving.spec
        self.shape = convert.desired_shape(self.serving)
        self.policy = convert.policy_from_spec(spec.eplb, self.shape.total_slots)
        self.bytes_per_expert = convert.bytes_per_expert(spec.model)
        self.ranks_expected = spec.groups * spec.ranks_per_group
        self._pages = RecordingFetch(self.fetch)
        self.reader = ScrapeLoadReader(fetch=self._pages, clock=self.clock)
        self._write(initial_decision(self.shape))

    @property
    def labels(self) -> dict[str, str]:
        return {MetricLabels.SERVING: self.serving.metadata.name or ""}

    def step(self, endpoints: Sequence[str], reports: Sequence[RankReport], gpus_per_node: int | None = None) -> Pass:
        """One planning pass: read the load from `endpoints` (the ranks' /metrics URLs), plan, and take a written
        generation as the one in force."""
        now = self.clock()
        self.applied = applied_generation(reports, self.generation, self.applied)
        if self.applied is not None:
            self._applied_at.setdefault(self.applied, now)
        behind = ranks_behind(reports, self.generation)
        state = PlacementState(
            self.placement_LGS, self.generation, self.applied, self.last_rebalance_time, self.plan, behind
        )
        sample, error = self._read(endpoints) if self.policy.enabled else (None, None)
        measured = self._measured_generation(now)
        decision = plan(
            self.policy,
            state,
            sample,
            now,
            load_error=error,
            bytes_per_expert=self.bytes_per_expert,
            gpus_per_node=gpus_per_node,
        )
        self.plan = decision.plan  # the controller's status.rebalancePlan: cleared by a decision without one
        if decision.writes:
            self._write(decision)
            self.last_rebalance_time = now
            self.rebalances += 1
            self.moved_experts += decision.moved_experts
        pages = [self._pages.pages[url] for url in endpoints if url in self._pages.pages]
        behind = ranks_behind(reports, self.generation)  # after a write: every rank, until they apply it
        return Pass(decision, self.generation, self.applied, behind, measured, weight_bytes(pages))

    def _write(self, decision: Decision) -> None:
        assert decision.placement_LGS is not None and decision.generation is not None
        self.document = placement_file(decision, self.shape)
        self.placement_LGS, self.generation = decision.placement_LGS, decision.generation

    def _read(self, endpoints: Sequence[str]) -> tuple[LoadSample | None, str | None]:
        self._pages.pages.clear()
        try:
            sample = self.reader.read(
                self.labels,
                endpoints,
                window_seconds=self.policy.window_seconds,
                num_layers=self.shape.num_layers,
                num_experts=self.shape.num_experts,
                ranks_expected=self.ranks_expected,
            )
        except (LoadReadError, ValueError) as error:
            return None, str(error)
        self._scrapes.append(self.clock())
        return sample, None

    def _measured_generation(self, now: float) -> int | None:
        """The generation in force, when every rank ran it since before the window of this pass's scrape began."""
        start = window_start(self._scrapes, now, self.policy.window_seconds)
        while len(self._scrapes) > 1 and start is not None and self._scrapes[0] < start:
            self._scrapes.popleft()
        applied_at = self._applied_at.get(self.generation)
        if start is None or applied_at is None or self.applied != self.generation:
            return None
        return self.generation if applied_at <= start else None


def shown_bytes(count: float) -> str:
    """A byte count for a person: kB under a MB, then MB, then GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count / 1e3:.1f} kB"


@dataclass(frozen=True)
class Summary:
    """The live summary line of a serving on Ray."""

    name: str
    groups_ready: int
    groups: int
    step: Pass
    rebalances: int
    moved_experts: int
    served: int
    failed: int

    def record(self) -> dict[str, Any]:
        """The summary as one JSON object (`k2 run --json`)."""
        decision = self.step.decision
        return {
            "serving": self.name,
            "groupsReady": self.groups_ready,
            "groups": self.groups,
            "generation": self.step.generation,
            "appliedGeneration": self.step.applied_generation,
            "ranksBehind": list(self.step.ranks_behind),
            "balancedness": decision.staleness,
            "measuredBalancedness": decision.measured_balancedness,
            "measuredGeneration": self.step.measured_generation,
            "predictedBalancedness": decision.predicted_balancedness,
            "reason": decision.reason.value,
            "message": decision.message,
            "movedExperts": decision.moved_experts,
            "rebalances": self.rebalances,
            "totalMovedExperts": self.moved_experts,
            "expertBytesIn": self.step.weight_bytes,
            "requestsServed": self.served,
            "requestsFailed": self.failed,
        }

    def line(self) -> str:
        """The summary as one line of text, with the planner's message when it wrote a generation."""
        decision, step = self.step.decision, self.step
        applied = "applied" if step.applied_generation == step.generation else f"{len(step.ranks_behind)} ranks behind"
        balance = (
            "balancedness ?"
            if decision.staleness is None
            else f"balancedness {decision.staleness:.3f}"
            + ("" if decision.measured_balancedness is None else f" (measured {decision.measured_balancedness:.3f})")
        )
        peer = step.weight_bytes.get(WeightSources.PEER, 0.0)
        line = (
            f"{self.name}: groups {self.groups_ready}/{self.groups} ready | generation {step.generation} ({applied})"
            f" | {balance} | moves {self.moved_experts} in {self.rebalances} rebalances"
            f" ({shown_bytes(peer)} from peers)"
            f" | requests {self.served} served, {self.failed} failed | {decision.reason.value}"
        )
        return line + (f": {decision.message}" if decision.writes else "")
