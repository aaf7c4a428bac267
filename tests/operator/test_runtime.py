"""Unit tests of the operator's plumbing: CLI, metrics endpoint, coalescing of triggers."""

from __future__ import annotations

import asyncio
import urllib.request

from k2_operator import metrics
from k2_operator.main import parse_args
from k2_operator.runtime import RUNTIME, trigger


def test_cli_defaults_to_all_namespaces() -> None:
    args = parse_args([])
    assert args.namespace == [] and args.metrics_port == 8080 and not args.standalone
    args = parse_args(["--namespace", "a", "-n", "b", "--standalone", "--metrics-port", "0"])
    assert args.namespace == ["a", "b"] and args.standalone and args.metrics_port == 0


def test_metrics_and_healthz_are_served() -> None:
    with metrics.observe("K2Training"):
        pass
    server = metrics.serve(0, "127.0.0.1")
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        assert 'k2_operator_reconciles_total{kind="K2Training",result="ok"}' in text
        assert "k2_operator_reconcile_duration_seconds_bucket" in text
    finally:
        server.shutdown()


def test_triggers_for_one_object_coalesce_into_one_more_run() -> None:
    calls: list[str] = []
    release = asyncio.Event()

    async def reconcile(_kube: object, namespace: str, name: str) -> None:
        calls.append(name)
        if len(calls) == 1:
            await release.wait()

    async def scenario() -> None:
        RUNTIME.kube = object()  # type: ignore[assignment]
        RUNTIME.reconcilers["Test"] = reconcile  # type: ignore[assignment]
        first = asyncio.create_task(trigger("Test", "ns", "a"))
        await asyncio.sleep(0)
        await asyncio.gather(*(trigger("Test", "ns", "a") for _ in range(5)))  # all arrive while the first runs
        release.set()
        await first

    try:
        asyncio.run(scenario())
    finally:
        RUNTIME.reconcilers.pop("Test", None)
        RUNTIME.kube = None
    assert calls == ["a", "a"]
