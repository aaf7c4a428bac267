"""The pure parts of benchmarks/operator_scale.py: what it counts as a write, whose it is, and how it summarises."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import pytest

from tests.support.paths import ROOT

APISERVER_METRICS = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests.
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",group="apps",resource="statefulsets",subresource="",verb="APPLY"} 40
apiserver_request_total{code="409",group="apps",resource="statefulsets",subresource="",verb="APPLY"} 2
apiserver_request_total{code="200",group="apps",resource="statefulsets",subresource="status",verb="PUT"} 7
apiserver_request_total{code="200",group="k2.ai",resource="k2servings",subresource="status",verb="PATCH"} 5
apiserver_request_total{code="200",group="k2.ai",resource="k2servings",subresource="",verb="GET"} 900
apiserver_request_total{code="200",group="coordination.k8s.io",resource="leases",subresource="",verb="PUT"} 300
# HELP etcd_requests_total [ALPHA] Etcd request counts for each operation and object type.
# TYPE etcd_requests_total counter
etcd_requests_total{group="apps",operation="update",resource="statefulsets"} 3
etcd_requests_total{group="apps",operation="get",resource="statefulsets"} 80
etcd_requests_total{group="coordination.k8s.io",operation="update",resource="leases"} 300
"""


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    name = "k2_bench_operator_scale"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "operator_scale.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_percentile_interpolates_between_closest_ranks(bench: ModuleType) -> None:
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile(range(101), 99) == 99.0
    assert bench.percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError, match="no values"):
        bench.percentile([], 50)


def test_write_counts_sum_codes_and_keep_only_writes(bench: ModuleType) -> None:
    counts = bench.write_counts(APISERVER_METRICS)
    assert counts[("APPLY", "apps", "statefulsets", "")] == 42  # both response codes
    assert counts[("PUT", "apps", "statefulsets", "status")] == 7
    assert counts[("etcd:update", "apps", "statefulsets", "")] == 3
    assert not any(key[0] in {"GET", "etcd:get"} for key in counts)


def test_writes_are_attributed_and_heartbeats_left_out(bench: ModuleType) -> None:
    before = bench.write_counts(APISERVER_METRICS)
    after = dict(before)
    after[("APPLY", "apps", "statefulsets", "")] += 10  # the operator's applies
    after[("PUT", "apps", "statefulsets", "status")] += 4  # the StatefulSet controller
    after[("PATCH", "k2.ai", "k2servings", "status")] += 1  # the operator's status write
    after[("PUT", "coordination.k8s.io", "leases", "")] += 60  # kwok's node leases
    after[("etcd:update", "apps", "statefulsets", "")] += 2
    writes = bench.split_writes(bench.write_delta(before, after))
    assert writes == bench.Writes(operator_requests=11, requests=15, storage=2)
    assert bench.split_writes(bench.write_delta(before, before)) == bench.Writes(0, 0, 0)


def test_process_accounting_from_proc_files(bench: ModuleType) -> None:
    # pid (comm with spaces and a paren) state ppid ... utime=fields[13] stime=fields[14] (1-based in proc(5))
    stat = "4242 (python -m (x)) S 1 4242 4242 0 -1 4194560 9000 0 0 0 250 150 0 0 20 0 9 0 100 0 0"
    assert bench.cpu_seconds(stat, 100) == 4.0
    status = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t   102400 kB\nVmRSS:\t   51200 kB\n"
    assert bench.peak_rss_mib(status) == 100.0
    with pytest.raises(ValueError, match="VmHWM"):
        bench.peak_rss_mib("Name:\tpython\n")


def test_the_plane_has_gpus_for_every_size_at_once(bench: ModuleType) -> None:
    serving = bench.manifests("k2serving-debug.yaml", 1, "s", {})[0]
    training = bench.manifests("k2training-debug.yaml", 1, "t", {})[0]
    per_pair = bench.gpus_of(serving, training)
    assert per_pair == 2 * 2 * 1 + 2 * 1  # groups x ranksPerGroup x gpusPerRank + numNodes x gpusPerNode
    assert bench.nodes_needed([1, 10, 100], per_pair) == math.ceil(111 * 6 / 8) + 1


def test_manifests_are_named_pinned_to_kwok_and_annotated(bench: ModuleType) -> None:
    bodies = bench.manifests("k2training-debug.yaml", 3, "train", bench.LONG_RUN)
    assert [b["metadata"]["name"] for b in bodies] == ["train-0", "train-1", "train-2"]
    assert all(b["spec"]["scheduling"]["nodeSelector"]["type"] == "kwok" for b in bodies)
    assert all(b["metadata"]["annotations"] == bench.LONG_RUN for b in bodies)
    bodies[0]["spec"]["steps"] = 1
    assert bodies[1]["spec"]["steps"] != 1, "copies are independent"


def test_ready_means_ready_for_the_current_generation(bench: ModuleType) -> None:
    ready = {"type": "Ready", "status": "True"}
    assert bench.is_ready({"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "conditions": [ready]}})
    assert not bench.is_ready(
        {"metadata": {"generation": 3}, "status": {"observedGeneration": 2, "conditions": [ready]}}
    )
    assert not bench.is_ready({"metadata": {"generation": 1}, "status": None})


def test_table_shows_ratios_per_object_and_sizes_that_timed_out(bench: ModuleType) -> None:
    def result(size: int, ready_s: float | None, cpu: float) -> object:
        return bench.SizeResult(
            size=size,
            objects=2 * size,
            latency_p50_s=0.5,
            latency_p99_s=1.0,
            ready_s=ready_s,
            ready=2 * size if ready_s else size,
            requests_to_ready=30.0 * size,
            steady_operator_requests_per_min=0.0,
            steady_requests_per_min=0.0,
            steady_storage_writes_per_min=0.0,
            operator_cpu_s=cpu,
            operator_peak_rss_mib=80.0,
        )

    rows = bench.table([result(1, 2.0, 0.5), result(10, 10.0, 2.5), result(100, None, 30.0)]).splitlines()
    assert len(rows) == 5
    assert "| 10 | 0.50 s | 1.00 s | 10.0 s | 0.50x |" in rows[3]  # 10 s for 20 objects against 2 s for 2
    assert "| 2.5 | 0.50x |" in rows[3]
    assert "not all in time (100 of 200) | - |" in rows[4]
