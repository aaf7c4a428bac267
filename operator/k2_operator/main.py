"""`k2 operator run`: start kopf with the K2Training, K2Serving and ExpertPlacement handlers.

All namespaces by default (`--namespace` to restrict, repeatable); Prometheus metrics and /healthz on
`--metrics-port`; `--standalone` skips kopf peering (no leader election between several operators). `main(argv,
kube=...)` runs on a given adapter instead of connecting (the seam tests use to inject faults).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import kopf

from k2_api.contract import Labels, Ports
from k2_api.kube import Kube
from k2_operator import metrics
from k2_operator.builders.common import MANAGED_BY
from k2_operator.builders.network_policy import MONITORING_NAMESPACE
from k2_operator.kube import AsyncKube
from k2_operator.runtime import RUNTIME, resync_forever

log = logging.getLogger("k2_operator")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="k2 operator run", description=__doc__)
    parser.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch only this namespace (repeatable); default: all"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=Ports.OPERATOR_METRICS, help="/metrics and /healthz port (0: off)"
    )
    parser.add_argument("--metrics-address", default="0.0.0.0", help="address of /metrics and /healthz")
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator instances")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="period of the full resync (the timer)")
    parser.add_argument(
        "--monitoring-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="a namespace whose pods may scrape the serving ranks' metrics port through the NetworkPolicies "
        f"(repeatable; default: {MONITORING_NAMESPACE})",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf keeps its bookkeeping in annotations only, never in status, so status writes stay ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.execution.max_workers = 8
    # Child watches are filtered by the API server: only the operator's own Jobs, StatefulSets, Deployments, rank Pods.
    managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    selectors = settings.watching.label_selectors
    selectors["batch", "v1", "jobs"] = f"{managed},{Labels.KIND}=K2Training"
    selectors["apps", "v1", "statefulsets"] = f"{managed},{Labels.KIND}=K2Serving"
    selectors["apps", "v1", "deployments"] = f"{managed},{Labels.KIND}=K2Serving"
    selectors["", "v1", "pods"] = f"{managed},{Labels.KIND}=K2Serving,app.kubernetes.io/component=rank"
    if RUNTIME.kube is None:
        RUNTIME.kube = AsyncKube.connect()
    memo["resync"] = asyncio.create_task(resync_forever(), name="k2-resync")


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if isinstance(task, asyncio.Task):
        task.cancel()


def main(argv: list[str], kube: Kube | None = None) -> int:
    """Runs the operator until SIGTERM; `kube` replaces the adapter it would connect (its field manager should be
    `k2-operator`)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # kopf logs every event handler call at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Importing the handler modules registers their kopf handlers and reconciles.
    from k2_operator import placement, serving, training  # noqa: F401

    if kube is not None:
        RUNTIME.kube = AsyncKube(kube)
    RUNTIME.namespaces = list(args.namespace)
    RUNTIME.resync_seconds = args.resync_seconds
    RUNTIME.monitoring_namespaces = list(args.monitoring_namespace) or [MONITORING_NAMESPACE]
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_address)
    kopf.run(
        standalone=args.standalone,
        clusterwide=not args.namespace,
        namespaces=list(args.namespace),
    )
    return 0
