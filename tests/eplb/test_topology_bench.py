"""benchmarks/eplb_topology.py at its quick scale: every plan's rounds within budget, cross-node copies counted."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.support.paths import ROOT


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    name = "k2_bench_eplb_topology"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "eplb_topology.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_quick_run_reports_each_plan_without_and_with_topology(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(row["gpus"], row["load"], row["gpus_per_node"]) for row in rows} == {
        (gpus, load, per_node) for gpus in (16, 24) for load in bench.LOAD_KINDS for per_node in (None, 8)
    }
    for row in rows:
        assert 1 <= row["rounds"] <= bench.MAX_ROUNDS
        assert row["copies"] <= row["rounds"] * row["budget"]
        assert 0 <= row["cross_node"] <= row["copies"]
        assert row["final"] > row["start"]
    # Over the whole quick run the topology saves cross-node copies (single plans may not: the search is greedy).
    crossed = {per_node: sum(r["cross_node"] for r in rows if r["gpus_per_node"] == per_node) for per_node in (None, 8)}
    assert crossed[8] < crossed[None]
    assert "cross-node (ratio)" in bench.table(rows)
