"""The operator at scale: N K2Servings plus N K2Trainings on a control plane of its own with kwok GPU nodes.

Starts a fresh local control plane in a temporary directory (hack/local_cluster.py `up`, without the real node, so
it can run beside the shared cluster), installs the CRDs, and for each size N (default 1, 10, 100) runs one operator
process (`k2 operator run --namespace bench-N`) and creates N of each kind from examples/ (worker pods on the kwok
nodes, trainings kept running with `k2.ai/fake-run-duration`). It measures:

- apply-to-children latency, p50 and p99: from `create` returning to the operator's child workloads being seen by a
  watch (a serving's group StatefulSets, a training's Job);
- time until every resource reports `Ready=True` for its current generation;
- API writes at steady state, per minute, from the API server's `apiserver_request_total`: after everything is
  Ready and one resync period has passed, over `--steady-s` seconds. "operator" counts the writes only the operator
  makes (any write to group k2.ai, any server-side apply); "all" adds the controllers, scheduler and kwok;
- the operator process's CPU seconds (after its /healthz answered) and its peak resident memory (VmHWM).

Ratios are per object against the smallest size, measured in the same run. The default run took 19 minutes on the
shared 2-core VM at load average 30 (docs/benchmarks.md), most of it N = 100 waiting for Ready.

    nice -n 10 python benchmarks/operator_scale.py                      # sizes 1 10 100
    nice -n 10 python benchmarks/operator_scale.py --sizes 1 10 --steady-s 30
    nice -n 10 python benchmarks/operator_scale.py --json results.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = ROOT / ".tools" / "bin"
GROUP, VERSION = "k2.ai", "v1alpha1"
PLURALS = {"K2Serving": "k2servings", "K2Training": "k2trainings"}
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"})
STORAGE_WRITES = frozenset({"create", "update", "delete"})
KWOK_NODES = {"type": "kwok"}  # hack/localcluster/nodes.py: worker pods must stay on the fake nodes
LONG_RUN = {"k2.ai/fake-run-duration": "86400s"}  # kwok keeps the training pods Running (hack/kwok-stages.yaml)
GPUS_PER_NODE = 8

WriteKey = tuple[str, str, str, str]
"""(verb, group, resource, subresource) of a write request, or ("etcd:" + operation, group, resource, "")."""


# --- pure: what is measured and how it is summarised ---------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile: no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q: {q} must be within 0..100")
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def write_counts(metrics_text: str) -> dict[WriteKey, float]:
    """Write requests by (verb, group, resource, subresource) from `apiserver_request_total`, and storage writes
    by ("etcd:" + operation, group, resource, "") from `etcd_requests_total`, summed over the other labels."""
    counts: dict[WriteKey, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "apiserver_request_total" and labels.get("verb") in WRITE_VERBS:
                key = (
                    labels["verb"],
                    labels.get("group", ""),
                    labels.get("resource", ""),
                    labels.get("subresource", ""),
                )
            elif sample.name == "etcd_requests_total" and labels.get("operation") in STORAGE_WRITES:
                key = (f"etcd:{labels['operation']}", labels.get("group", ""), labels.get("resource", ""), "")
            else:
                continue
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def is_storage(key: WriteKey) -> bool:
    return key[0].startswith("etcd:")


def is_operator_write(key: WriteKey) -> bool:
    """Write requests no component but the operator makes here: to group k2.ai (no EPLB controller runs), and
    server-side applies."""
    verb, group, _, _ = key
    return not is_storage(key) and (group == GROUP or verb == "APPLY")


def is_heartbeat(key: WriteKey) -> bool:
    """kwok's node leases and node status: written on a timer whatever the operator does."""
    return key[2] in {"leases", "nodes"}


def write_delta(before: Mapping[WriteKey, float], after: Mapping[WriteKey, float]) -> dict[WriteKey, float]:
    """Writes between two scrapes (keys with no new writes left out)."""
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: value for key, value in delta.items() if value > 0}


@dataclass(frozen=True)
class Writes:
    operator_requests: float
    """Write requests only the operator makes (`is_operator_write`)."""
    requests: float
    """Write requests of every client except node heartbeats."""
    storage: float
    """Objects actually written to etcd (a no-op apply writes nothing), except node heartbeats."""


def split_writes(delta: Mapping[WriteKey, float]) -> Writes:
    kept = {k: v for k, v in delta.items() if not is_heartbeat(k)}
    return Writes(
        operator_requests=sum(v for k, v in kept.items() if is_operator_write(k)),
        requests=sum(v for k, v in kept.items() if not is_storage(k)),
        storage=sum(v for k, v in kept.items() if is_storage(k)),
    )


def cpu_seconds(stat_line: str, ticks_per_second: int) -> float:
    """utime + stime of a /proc/PID/stat line, in seconds (fields after the parenthesised command name)."""
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second


def peak_rss_mib(status_text: str) -> float:
    """VmHWM (peak resident set) of a /proc/PID/status text, in MiB."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError("no VmHWM line in the status text")


def nodes_needed(sizes: Iterable[int], gpus_per_object_pair: int, gpus_per_node: int = GPUS_PER_NODE) -> int:
    """kwok GPU nodes for every size's servings and trainings at once (sizes keep their objects until the end)."""
    return math.ceil(sum(sizes) * gpus_per_object_pair / gpus_per_node) + 1


@dataclass
class SizeResult:
    size: int
    """K2Servings created, and as many K2Trainings."""
    objects: int
    latency_p50_s: float
    latency_p99_s: float
    ready_s: float | None
    """From the first create to every resource Ready; None when not all were within the timeout."""
    ready: int
    """Resources Ready (for their current generation) at that moment, or at the timeout."""
    requests_to_ready: float
    """Operator write requests from the first create to all Ready."""
    steady_operator_requests_per_min: float
    steady_requests_per_min: float
    steady_storage_writes_per_min: float
    operator_cpu_s: float
    operator_peak_rss_mib: float
    steady_writes: dict[str, float] = field(default_factory=dict)
    """The steady window's writes by `verb group/resource/subresource` (node heartbeats included)."""


def ratio(value: float, base: float) -> str:
    return "-" if base <= 0 else f"{value / base:.2f}x"


def table(results: list[SizeResult]) -> str:
    """Markdown table; the ratios are per object against the first (smallest) size."""
    base = results[0]

    def per_object(result: SizeResult, value: float) -> float:
        return value / result.objects

    def ready(result: SizeResult) -> str:
        if result.ready_s is None:
            return f"not all in time ({result.ready} of {result.objects})"
        return f"{result.ready_s:.1f} s"

    def ready_ratio(result: SizeResult) -> str:
        if result.ready_s is None or base.ready_s is None:
            return "-"
        return ratio(per_object(result, result.ready_s), per_object(base, base.ready_s))

    rows = [
        f"| N each | p50 apply-to-children | p99 | all Ready | per object vs N={base.size} | operator write requests "
        "to Ready (per object) | steady write requests/min (operator / all) | steady etcd writes/min "
        f"| operator CPU s | per object vs N={base.size} | peak RSS |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.size} | {r.latency_p50_s:.2f} s | {r.latency_p99_s:.2f} s | {ready(r)} | {ready_ratio(r)}"
            f" | {r.requests_to_ready:.0f} ({per_object(r, r.requests_to_ready):.1f})"
            f" | {r.steady_operator_requests_per_min:.0f} / {r.steady_requests_per_min:.0f}"
            f" | {r.steady_storage_writes_per_min:.0f}"
            f" | {r.operator_cpu_s:.1f}"
            f" | {ratio(per_object(r, r.operator_cpu_s), per_object(base, base.operator_cpu_s))}"
            f" | {r.operator_peak_rss_mib:.0f} MiB |"
        )
    return "\n".join(rows)


def manifests(kind_file: str, count: int, prefix: str, annotations: Mapping[str, str]) -> list[dict[str, Any]]:
    """`count` copies of an example, named PREFIX-i, pinned to the kwok nodes."""
    body = yaml.safe_load((ROOT / "examples" / kind_file).read_text())
    out = []
    for index in range(count):
        item = copy.deepcopy(body)
        item["metadata"] = {"name": f"{prefix}-{index}", "annotations": dict(annotations)}
        scheduling = item["spec"].setdefault("scheduling", {})
        scheduling["nodeSelector"] = {**scheduling.get("nodeSelector", {}), **KWOK_NODES}
        out.append(item)
    return out


def gpus_of(serving: Mapping[str, Any], training: Mapping[str, Any]) -> int:
    s, t = serving["spec"], training["spec"]
    return int(s["groups"] * s["ranksPerGroup"] * s["gpusPerRank"] + t["numNodes"] * t["gpusPerNode"])


def is_ready(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))


# --- I/O: the control plane, the operator process, watches ----------------------------------------------------------


def load_local_cluster() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k2_local_cluster", ROOT / "hack" / "local_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Plane:
    kubeconfig: Path
    env: dict[str, str]

    def kubectl(self, *args: str, input: str | None = None) -> str:
        argv = [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=300, env=self.env)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    def writes(self) -> dict[WriteKey, float]:
        return write_counts(self.kubectl("get", "--raw", "/metrics"))


@contextmanager
def control_plane(num_nodes: int) -> Iterator[Plane]:
    cluster = load_local_cluster()
    root = Path(tempfile.mkdtemp(prefix="k2-bench-plane-"))
    try:
        cluster.up(root, num_nodes=num_nodes, real_node=False)
        env = {**os.environ, "KUBECONFIG": str(root / "kubeconfig"), "PATH": f"{TOOLS_BIN}:{os.environ['PATH']}"}
        plane = Plane(root / "kubeconfig", env)
        crds = sorted((ROOT / "crds").glob("*.k2.ai.yaml"))
        plane.kubectl("apply", "--server-side", *(f"--filename={f}" for f in crds))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        wait_served(plane)
        yield plane
    finally:
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)


def wait_served(plane: Plane, timeout_s: float = 120.0) -> None:
    """Until each K2 kind can be listed: an Established CRD answers 429 while its storage initializes, which would
    hold back the operator's first watch (kopf retries after a backoff) and so add seconds to the first size."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(api_client(plane.kubeconfig))
    deadline = time.monotonic() + timeout_s
    for plural in (*PLURALS.values(), "expertplacements"):
        while True:
            try:
                api.list_cluster_custom_object(GROUP, VERSION, plural)
                break
            except ApiException as error:
                if error.status != 429 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def operator(plane: Plane, namespace: str, resync_s: float, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`k2 operator run` watching `namespace`, once its /healthz answers."""
    port = free_port()
    argv = [sys.executable, "-m", "k2_api.cli", "operator", "run", "--namespace", namespace, "--standalone"]
    argv += ["--metrics-port", str(port), "--metrics-address", "127.0.0.1", "--resync-seconds", str(resync_s)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=plane.env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not _healthy(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start: {log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def process_cpu_s(pid: int) -> float:
    return cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def process_peak_rss_mib(pid: int) -> float:
    return peak_rss_mib(Path(f"/proc/{pid}/status").read_text())


def api_client(kubeconfig: Path) -> Any:
    """A `kubernetes` ApiClient for the bench plane (its own Configuration, not the process-wide default)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig), client_configuration=configuration
    )
    return client.ApiClient(configuration=configuration)


class ChildWatch:
    """When a watch first saw each owner's child workloads: StatefulSets and Jobs, keyed "OwnerKind/name"."""

    def __init__(self, kubeconfig: Path, namespace: str):
        from kubernetes import client

        api = api_client(kubeconfig)
        self._listers: dict[str, Any] = {
            "statefulsets": client.AppsV1Api(api).list_namespaced_stateful_set,
            "jobs": client.BatchV1Api(api).list_namespaced_job,
        }
        self.namespace = namespace
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        for kind in self._listers:
            threading.Thread(target=self._run, args=(kind,), daemon=True, name=f"watch-{kind}").start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, kind: str) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream: Any = watch.Watch().stream(self._listers[kind], self.namespace, timeout_seconds=5)  # type: ignore[no-untyped-call]
            for event in stream:
                if event["type"] == "ADDED":
                    seen = time.monotonic()
                    for ref in event["object"].metadata.owner_references or []:
                        if ref.controller:
                            with self._lock:
                                self._seen.setdefault(f"{ref.kind}/{ref.name}", []).append(seen)
                if self._stop.is_set():
                    break

    def children_at(self, key: str, expected: int) -> float | None:
        """When the last of `expected` children of `key` was seen, None while fewer were."""
        with self._lock:
            times = self._seen.get(key, [])
            return max(times) if len(times) >= expected else None


def list_objects(api: Any, namespace: str, plural: str) -> list[dict[str, Any]]:
    answer: dict[str, Any] = api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
    return list(answer["items"])


def wait_ready(
    api: Any, watch: ChildWatch, namespace: str, created: Mapping[str, tuple[float, int]], deadline: float
) -> tuple[dict[str, float], float | None, int]:
    """Polls until every created resource has its children and is Ready, or the deadline: (apply-to-children
    latency by resource, when all were Ready or None, how many were Ready)."""
    latencies: dict[str, float] = {}
    while True:
        for key, (created_at, expected) in created.items():
            seen = watch.children_at(key, expected)
            if key not in latencies and seen is not None:
                latencies[key] = seen - created_at
        items = [i for plural in PLURALS.values() for i in list_objects(api, namespace, plural)]
        ready = sum(map(is_ready, items))
        if len(latencies) == len(created) and ready == len(created):
            return latencies, time.monotonic(), ready
        if time.monotonic() > deadline:
            return latencies, None, ready
        time.sleep(0.25)


def measure(plane: Plane, size: int, resync_s: float, steady_s: float, timeout_s: float, logs: Path) -> SizeResult:
    namespace = f"bench-{size}"
    plane.kubectl("create", "namespace", namespace)
    servings = manifests("k2serving-debug.yaml", size, "serve", {})
    trainings = manifests("k2training-debug.yaml", size, "train", LONG_RUN)
    from kubernetes import client

    api = client.CustomObjectsApi(api_client(plane.kubeconfig))
    watch = ChildWatch(plane.kubeconfig, namespace)
    watch.start()
    with operator(plane, namespace, resync_s, logs / f"operator-{size}.log") as process:
        cpu_at_start = process_cpu_s(process.pid)
        before = plane.writes()
        created: dict[str, tuple[float, int]] = {}  # "Kind/name" -> (create returned, child workloads expected)
        begin = time.monotonic()
        for serving, training in zip(servings, trainings, strict=True):
            for body, children in ((serving, serving["spec"]["groups"]), (training, 1)):
                api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[body["kind"]], body)
                created[f"{body['kind']}/{body['metadata']['name']}"] = (time.monotonic(), children)
        latencies, ready_at, ready_count = wait_ready(api, watch, namespace, created, begin + timeout_s)
        at_ready = plane.writes()
        time.sleep(resync_s + 2)  # one full resync after Ready, so that the window below is steady
        steady_before = plane.writes()
        time.sleep(steady_s)
        steady_after = plane.writes()
        cpu = process_cpu_s(process.pid) - cpu_at_start
        rss = process_peak_rss_mib(process.pid)
    watch.stop()
    steady = write_delta(steady_before, steady_after)
    per_min = 60 / steady_s
    steady_split = split_writes(steady)
    return SizeResult(
        size=size,
        objects=len(created),
        latency_p50_s=percentile(latencies.values(), 50) if latencies else math.nan,
        latency_p99_s=percentile(latencies.values(), 99) if latencies else math.nan,
        ready_s=None if ready_at is None else ready_at - begin,
        ready=ready_count,
        requests_to_ready=split_writes(write_delta(before, at_ready)).operator_requests,
        steady_operator_requests_per_min=steady_split.operator_requests * per_min,
        steady_requests_per_min=steady_split.requests * per_min,
        steady_storage_writes_per_min=steady_split.storage * per_min,
        operator_cpu_s=cpu,
        operator_peak_rss_mib=rss,
        steady_writes={" ".join((k[0], "/".join(filter(None, k[1:])))): v for k, v in sorted(steady.items())},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="N of each kind per step")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="the operator's --resync-seconds")
    parser.add_argument("--steady-s", type=float, default=60.0, help="steady-state window for writes/min")
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="per size, until all Ready (then measured anyway)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the control plane and operator are stopped
    if any(n < 1 for n in args.sizes) or args.steady_s <= 0:
        parser.error("--sizes must be >= 1 and --steady-s > 0")
    sizes = sorted(args.sizes)
    serving = manifests("k2serving-debug.yaml", 1, "x", {})[0]
    training = manifests("k2training-debug.yaml", 1, "x", {})[0]
    num_nodes = nodes_needed(sizes, gpus_of(serving, training))
    logs = Path(tempfile.mkdtemp(prefix="k2-bench-logs-"))
    started = time.monotonic()
    with control_plane(num_nodes) as plane:
        print(f"control plane with {num_nodes} kwok nodes up in {time.monotonic() - started:.0f} s", flush=True)
        results = []
        for size in sizes:
            results.append(measure(plane, size, args.resync_seconds, args.steady_s, args.timeout_s, logs))
            print(json.dumps(asdict(results[-1])), flush=True)
    print()
    print(table(results))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}; "
        f"resync {args.resync_seconds:g} s, steady window {args.steady_s:g} s; operator logs in {logs})"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
