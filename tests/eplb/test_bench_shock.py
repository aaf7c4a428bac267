"""`k2 eplb bench --shock`: only the shock suite, on the same loads as the full run."""

from __future__ import annotations

from typing import Any

from k2_eplb.bench import QUICK, run


def without_timings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that do not depend on the machine's speed (the deadline rows do), timings dropped."""
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows if not row["method"].endswith(" s")]


def test_shock_only_run_measures_the_same_loads_as_the_full_run() -> None:
    full = run(QUICK, 2)
    shock = run(QUICK, 2, only_shock=True)
    assert shock["fresh"] == shock["drift"] == shock["curve"] == shock["locality"] == []
    assert without_timings(shock["shock"]) == without_timings(full["shock"])
    assert set(shock["targets"]) == {name for name in full["targets"] if name.startswith("shock_")}
    mean = {(row["gpus"], row["load"]): row for row in shock["shock"] if row["method"] == "ours target mean 0.02"}
    layer = {(row["gpus"], row["load"]): row for row in shock["shock"] if row["method"] == "ours target 0.02"}
    assert mean.keys() == layer.keys() and len(mean) == 6
    assert all(mean[case]["moves"] <= layer[case]["moves"] for case in mean)
