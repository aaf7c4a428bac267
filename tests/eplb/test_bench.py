"""`k2 eplb bench --quick`: the report's fields and the relations it is meant to show."""

from __future__ import annotations

import json

import pytest

from k2_eplb.bench import BYTES_PER_EXPERT, main


def run_quick(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    assert main(["--quick", "--seed", "1", *flags]) == 0
    return capsys.readouterr().out


def test_quick_bench_json_fields_and_relations(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(run_quick(capsys, "--json"))
    assert data["example"]["baseline_max_load"] == 232.0
    assert data["example"]["ours_max_load"] <= 205.0
    assert {(row["gpus"], row["slots_per_gpu"], row["load"]) for row in data["fresh"]} == {
        (gpus, slots, load) for gpus, slots in ((16, 4), (24, 3)) for load in ("lognormal", "zipf", "hotspot")
    }
    for row in data["fresh"]:
        assert row["ours"] >= row["baseline"]
        assert 0 < row["ours_min_layer"] <= row["ours"] <= 1
        assert row["ours_seconds"] > 0 and row["baseline_seconds"] > 0
    for row in data["drift"]:
        assert row["ours_moves"] <= row["budget"] < row["baseline_moves"]
        assert row["ours_bytes"] == row["ours_moves"] * BYTES_PER_EXPERT
        assert row["baseline_bytes"] == row["baseline_moves"] * BYTES_PER_EXPERT
        assert row["ours"] >= row["stale"] - 1e-12
    budgets = [row["budget_fraction"] for row in data["curve"] if row["gpus"] == 16 and row["drift"] == "step"]
    assert budgets == [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, None]
    for row in data["curve"]:
        if row["budget_fraction"] == 0.0:
            assert row["moves"] == 0
        elif row["budget_fraction"] is not None:
            assert row["moved_fraction"] <= row["budget_fraction"]
    plain, local = (row for row in data["locality"] if row["gpus"] == 16)
    assert (plain["gpus_per_node"], local["gpus_per_node"]) == (None, 8)
    assert local["moves"] <= local["budget"] and local["cross_node_moves"] <= local["moves"]
    shock = {(row["gpus"], row["load"], row["method"]): row for row in data["shock"]}
    methods = ["stale", "baseline fresh", "ours fresh", "ours fresh aligned", "ours 15% budget"]
    methods += ["ours target 0.01", "ours target 0.02", "ours target 0.03", "ours target 0.04", "ours target 0.02 1 s"]
    methods += ["ours target mean 0.02", "ours target mean 3 paths 0.02"]
    assert [row["method"] for row in data["shock"] if row["gpus"] == 16 and row["load"] == "zipf"] == methods
    for (gpus, kind, method), row in shock.items():
        assert row["bytes"] == row["moves"] * BYTES_PER_EXPERT
        assert row["moved_fraction"] == row["moves"] / (4 * 16 * 4 if gpus == 16 else 4 * 24 * 3)
        fresh = shock[(gpus, kind, "ours fresh")]
        if method == "stale":
            assert row["moves"] == 0 and row["balancedness"] < fresh["balancedness"]
        elif method == "ours 15% budget":
            assert 0 < row["moved_fraction"] <= 0.15
        elif method.endswith(" s"):  # the anytime mode: whatever its deadline allowed, never below the start
            assert row["balancedness"] >= shock[(gpus, kind, "stale")]["balancedness"] - 1e-12
        elif method.startswith("ours target"):
            assert row["balancedness"] >= fresh["balancedness"] - float(method.split()[-1]) - 1e-12
            assert row["moves"] <= shock[(gpus, kind, "ours fresh aligned")]["moves"]
        elif method == "ours fresh aligned":
            assert row["balancedness"] == pytest.approx(fresh["balancedness"], rel=1e-12)
    targets = data["targets"]
    for name in (
        "shock_target_within_epsilon_of_ours_fresh",
        "shock_target_moves_below_ours_fresh",
        "fresh_at_least_baseline_every_case",
        "example_max_load_at_most_205",
        "example_baseline_232",
        "drift_within_budget",
    ):
        assert targets[name] is True, name


def test_quick_bench_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_quick(capsys)
    assert "8-GPU example, max GPU load: ours" in text
    assert "Balance vs moves" in text and "unlimited" in text
    assert "Shock (x lognormal(0, 0.25)" in text and "ours target 0.01" in text
    assert "Targets:" in text
