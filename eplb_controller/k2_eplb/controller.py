"""`k2 eplb run`: the EPLB controller, a plain loop around the pure planner.

Each pass, for every K2Serving with spec.eplb.enabled whose interval is due: read its ExpertPlacement (status
.placementName, else the serving's own name), read the expert load of every group over spec.eplb.windowSeconds
(Prometheus when a URL is configured, else direct scrapes of the rank pods), read how many ranks share a node from the
rank pods' node assignment, plan (in rounds when one budget cannot reach the target, `k2_eplb.rounds`), and, when the
plan says so, write its next round as the new slot tables with spec.generation + 1 and its progress as
status.rebalancePlan. Every pass records its finding as the `Planned` condition on the ExpertPlacement status (True
with reason Rebalanced or Reshaped, or False with the reason it wrote nothing) and in the controller's metrics; a
written generation, and a change to a warning reason (PartialMetrics, MetricsUnavailable), also post a Kubernetes
Event on the ExpertPlacement.

The controller is the only writer of ExpertPlacement.spec once the operator has created it. A placement whose shape
no longer fits its serving is re-solved before anything else, on every pass, whether EPLB is enabled or not.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from k2_api import ExpertPlacement, K2Serving
from k2_api.contract import Annotations, MetricLabels
from k2_api.kube import Conflict, Kube, KubeError, Object
from k2_eplb import convert
from k2_eplb import kube as api
from k2_eplb.controller_metrics import ControllerMetrics, Liveness, serve
from k2_eplb.load import LoadReadError, LoadSample
from k2_eplb.planner import Decision, Reason, plan, reshape
from k2_eplb.prometheus_reader import PrometheusLoadReader, url_allowed
from k2_eplb.scrape_reader import ScrapeLoadReader
from k2_eplb.topology import ranks_per_node

log = logging.getLogger("k2_eplb")

WARNING_REASONS = frozenset({Reason.PARTIAL_METRICS, Reason.METRICS_UNAVAILABLE, Reason.INVALID_PLACEMENT})


@dataclass
class Controller:
    """One controller instance; `reconcile(serving)` is one planning pass for one serving."""

    kube: Kube
    """The adapter, with the field manager `k2-eplb` (`kube.connect()`)."""
    prometheus_url: str | None = None
    allowed_prometheus_urls: tuple[str, ...] = ()
    """URL prefixes a serving's spec.eplb.prometheusUrl may name, besides `prometheus_url` itself."""
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)
    endpoints: Callable[[K2Serving], Sequence[str]] | None = None
    """Rank metrics URLs for direct scraping; default: the rank pods' addresses from the API server."""
    gpus_per_node: Callable[[K2Serving], int | None] | None = None
    """Ranks per node (None: unknown); default: from the rank pods' node assignment (`topology.ranks_per_node`)."""
    namespace_label: str | None = "namespace"
    """Label Prometheus puts the pod namespace in (None: select by `serving` only)."""
    clock: Callable[[], float] = time.time
    one_shot: bool = False
    """Direct scraping with no history: scrape, wait a window, scrape again (for --once)."""
    scrape_reader: ScrapeLoadReader = field(default_factory=ScrapeLoadReader)
    liveness: Liveness | None = None
    """Told of every pass `run_forever` completes (/healthz)."""
    failures: int = 0
    """Listings and passes over one serving that ended in an error, since start (`--once` exits 1 if any)."""
    _due: dict[tuple[str, str], float] = field(default_factory=dict)

    def run_once(self, namespace: str | None = None, *, force: bool = False) -> dict[tuple[str, str], Decision]:
        """One pass: plan every enabled serving whose interval is due (all with `force`), and check the shape of the
        disabled ones. No error stops it: a failed listing ends the pass, a failed serving is skipped; both are
        logged and counted (`failures`, and the metrics)."""
        decisions: dict[tuple[str, str], Decision] = {}
        try:
            items = api.list_serving_objects(self.kube, namespace)
        except KubeError as error:
            self.failures += 1
            self.metrics.pass_errors.inc()
            log.error("eplb: listing K2Servings failed: %s", error)
            return decisions
        for item in items:
            key = api.key_of(item)
            try:
                decision = self._pass(item, force)
            except Conflict as error:  # someone wrote the placement after this pass read it: nothing was written
                self._failed(key)
                self._due.pop(key, None)
                log.warning("eplb %s/%s: changed while planning, re-read next pass: %s", key[0], key[1], error)
                continue
            except (KubeError, OSError, ValueError) as error:  # ValueError: a K2Serving that does not validate
                self._failed(key)
                log.error("eplb %s/%s: %s", key[0], key[1], error)
                continue
            except Exception:  # a bug must not stop the loop: counted, logged with its traceback, next pass retries
                self._failed(key)
                log.exception("eplb %s/%s: unexpected error", key[0], key[1])
                continue
            if decision is not None:
                decisions[key] = decision
        return decisions

    def run_forever(self, namespace: str | None, interval: float, stop: threading.Event) -> None:
        """Passes every `interval` seconds until `stop` is set (a pass in progress finishes first)."""
        while not stop.is_set():
            self.run_once(namespace)
            if self.liveness is not None:
                self.liveness.beat()
            stop.wait(interval)

    def _pass(self, item: Object, force: bool) -> Decision | None:
        serving = K2Serving.model_validate(item)
        key = api.key_of(item)
        if serving.spec.eplb.enabled:
            now = self.clock()
            if not force and now < self._due.get(key, 0.0):
                return None
            self._due[key] = now + serving.spec.eplb.interval_seconds
        return self.reconcile(serving)

    def _failed(self, key: tuple[str, str]) -> None:
        self.failures += 1
        self.metrics.errors.labels(key[1], key[0]).inc()

    def reconcile(self, serving: K2Serving) -> Decision | None:
        """Reshape, else read, plan and write, for one serving; None when it has no ExpertPlacement yet, or when EPLB
        is disabled and the placement fits."""
        namespace, name = serving.metadata.namespace or "", serving.metadata.name or ""
        placement_name = (serving.status.placement_name if serving.status else None) or name
        placement = api.get_placement(self.kube, namespace, placement_name)
        desired = convert.desired_shape(serving)
        decision = None
        if placement is not None:
            decision = reshape(convert.placement_shape(placement), desired, placement.spec.generation)
        if decision is None and not serving.spec.eplb.enabled:
            self.metrics.skipped.labels(name, namespace, Reason.DISABLED.value).inc()
            return None
        if placement is None:
            log.info("eplb %s/%s: no ExpertPlacement %s yet", namespace, name, placement_name)
            return None
        now = self.clock()
        if decision is None:
            decision = convert.invalid_placement(placement) or self._plan(serving, placement, now)
        if decision.writes:
            api.write_placement(self.kube, placement, convert.spec_of(decision, desired), now)
        self._record(placement, decision, now)
        self.metrics.observe(name, namespace, decision)
        log.info("eplb %s/%s: %s: %s", namespace, name, decision.reason.value, decision.message)
        return decision

    def _plan(self, serving: K2Serving, placement: ExpertPlacement, now: float) -> Decision:
        spec = placement.spec
        sample, error = self._read_load(serving, placement)
        last = api.parse_rfc3339(placement.metadata.annotations.get(Annotations.REBALANCED_AT, ""))
        return plan(
            convert.policy_from_spec(serving.spec.eplb, spec.total_slots),
            convert.placement_state(placement, last),
            sample,
            now,
            load_error=error,
            bytes_per_expert=convert.bytes_per_expert(serving.spec.model),
            gpus_per_node=self._gpus_per_node(serving, spec.ranks),
        )

    def _gpus_per_node(self, serving: K2Serving, ranks: int) -> int | None:
        """Ranks per node of the serving's groups, when it divides the placement's ranks (else None). A failed pod
        listing plans without topology rather than not at all."""
        if self.gpus_per_node is not None:
            per_node = self.gpus_per_node(serving)
        else:
            try:
                placed = api.rank_nodes(self.kube, serving)
            except KubeError as error:
                log.warning("eplb %s: no rank pods listed, planning without topology: %s", serving.metadata.name, error)
                return None
            per_node = ranks_per_node(placed, ranks, serving.spec.groups)
        return per_node if per_node is not None and ranks % per_node == 0 else None

    def _read_load(self, serving: K2Serving, placement: ExpertPlacement) -> tuple[LoadSample | None, str | None]:
        spec = placement.spec
        eplb = serving.spec.eplb
        namespace, name = serving.metadata.namespace or "", serving.metadata.name or ""
        window = float(eplb.window_seconds)
        ranks_expected = serving.spec.groups * serving.spec.ranks_per_group
        url = eplb.prometheus_url or self.prometheus_url
        allowed = (*self.allowed_prometheus_urls, *([self.prometheus_url] if self.prometheus_url else []))
        if eplb.prometheus_url and not url_allowed(eplb.prometheus_url, allowed):
            shown = ", ".join(allowed) or "none"
            return None, (
                f"spec.eplb.prometheusUrl {eplb.prometheus_url!r} is not allowed "
                f"(allowed: {shown}; see --allowed-prometheus-url)"
            )
        try:
            if url:
                labels = {MetricLabels.SERVING: name}
                if self.namespace_label:
                    labels[self.namespace_label] = namespace
                reader = PrometheusLoadReader(url)
                sample = reader.read(
                    labels,
                    window_seconds=window,
                    num_layers=spec.num_layers,
                    num_experts=spec.num_experts,
                    ranks_expected=ranks_expected,
                )
                return sample, None
            endpoints = list(self.endpoints(serving) if self.endpoints else api.rank_endpoints(self.kube, serving))
            read = self.scrape_reader.read_twice if self.one_shot else self.scrape_reader.read
            sample = read(
                {MetricLabels.SERVING: name},
                endpoints,
                window_seconds=window,
                num_layers=spec.num_layers,
                num_experts=spec.num_experts,
                ranks_expected=ranks_expected,
            )
            return sample, None
        except (LoadReadError, ValueError) as error:
            return None, str(error)

    def _record(self, placement: ExpertPlacement, decision: Decision, now: float) -> None:
        """Write the Planned condition and owned status fields when they changed; post Events on news."""
        previous = next(
            (c for c in (placement.status.conditions if placement.status else []) if c.type == convert.PLANNED), None
        )
        status = convert.status_fields(decision, placement, now)
        if status != convert.observed_fields(placement):
            api.apply_status(self.kube, placement, status)
        if decision.writes:
            api.post_event(self.kube, placement, "Normal", decision.reason.value, decision.message)
        elif decision.reason in WARNING_REASONS and (previous is None or previous.reason != decision.reason.value):
            api.post_event(self.kube, placement, "Warning", decision.reason.value, decision.message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 eplb run", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--namespace", default=None, help="watch one namespace (default: all)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between passes (default 10)")
    parser.add_argument("--once", action="store_true", help="plan every enabled serving once and exit")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics and /healthz on this port (0: off)")
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address of /metrics and /healthz")
    parser.add_argument(
        "--prometheus-url", default=None, help="Prometheus for servings without spec.eplb.prometheusUrl"
    )
    parser.add_argument(
        "--allowed-prometheus-url",
        action="append",
        default=[],
        metavar="URL",
        help="a URL prefix spec.eplb.prometheusUrl may name (repeatable; --prometheus-url is always allowed)",
    )
    parser.add_argument(
        "--namespace-label",
        default="namespace",
        help="label holding the pod namespace in Prometheus ('' to select by serving only)",
    )
    parser.add_argument(
        "--healthz-intervals",
        type=float,
        default=10.0,
        help="/healthz fails when no pass completed for this many --interval periods (default 10)",
    )
    parser.add_argument("--kubeconfig", type=Path, default=None, help="default: $KUBECONFIG, then in-cluster")
    args = parser.parse_args(list(argv))
    if args.interval <= 0:
        parser.error("--interval must be > 0")
    if args.healthz_intervals <= 0:
        parser.error("--healthz-intervals must be > 0")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    metrics = ControllerMetrics()
    liveness = Liveness(args.interval * args.healthz_intervals)
    if args.metrics_port:
        serve(metrics, liveness, args.metrics_port, args.metrics_address)
    controller = Controller(
        api.connect(args.kubeconfig),
        prometheus_url=args.prometheus_url,
        allowed_prometheus_urls=tuple(args.allowed_prometheus_url),
        metrics=metrics,
        liveness=liveness,
        namespace_label=args.namespace_label or None,
        one_shot=args.once,
    )
    if args.once:
        controller.run_once(args.namespace, force=True)
        return 1 if controller.failures else 0
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    controller.run_forever(args.namespace, args.interval, stop)
    return 0
