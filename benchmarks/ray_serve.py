"""`k2 run` (a K2Serving on a local Ray instance) against the process-based group (`python -m k2_workers.serve`
ranks plus a frontend, what the pods run), in one run and with the same manifest: serving tokens/s and request
latency through the frontend's OpenAI `/v1/completions`, and the time until the frontend answers /healthz.

Both runners get the manifest (`examples/k2serving-debug.yaml`, `--groups` to shrink it) with `spec.eplb.enabled`
false (the process group has no EPLB; on, `k2 run` would also scrape the ranks and move experts during the load),
and the same rank flags (seed 0, round-robin placement, no gRPC port), one torch thread per rank. The load is
`--clients` concurrent clients each sending `--requests` requests of one prompt (`max_tokens` `--max-tokens`,
temperature 0) after `--warmup` untimed requests; tokens are counted from `usage.completion_tokens`, tokens/s is
their sum over the load's wall time. The baseline of the ratios is the process group, measured in the same run.
Loopback only.

    .venv/bin/python benchmarks/ray_serve.py [--clients 4] [--requests 8] [--groups 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the serving tests' process helpers

from tests.serve.worker_process import request, serve_processes, wait_healthy  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

EXAMPLE = ROOT / "examples" / "k2serving-debug.yaml"
PROMPT = "The expert placement is a Kubernetes object"
LOOPBACK = "127.0.0.1"
STRIPPED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "K2_GROUP", "RAY_ADDRESS")
READY_TIMEOUT_S = 600.0


def manifest(directory: Path, groups: int | None) -> tuple[Path, dict[str, Any]]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if groups is not None:
        document["spec"]["groups"] = groups
    document["spec"].setdefault("eplb", {})["enabled"] = False  # the process group has no EPLB to compare with
    path = directory / "k2serving.yaml"
    path.write_text(yaml.safe_dump(document))
    return path, document["spec"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env | {"OMP_NUM_THREADS": "1"}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def complete(url: str, max_tokens: int) -> tuple[float, int]:
    """One completion: (latency s, completion tokens)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    started = time.monotonic()
    status, answer = request(url + "/v1/completions", body)
    latency = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"{url}: /v1/completions answered {status}: {answer}")
    return latency, int(answer["usage"]["completion_tokens"])


def drive(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`clients` threads, `requests` completions each; tokens/s over the load's wall time and latency percentiles."""
    results: list[tuple[float, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            for _ in range(requests):
                result = complete(url, max_tokens)
                with lock:
                    results.append(result)
        except BaseException as error:  # reported after the join
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed") from errors[0]
    latencies = [latency for latency, _ in results]
    tokens = sum(count for _, count in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 99),
        "load_avg_1m": (load_before + os.getloadavg()[0]) / 2,
    }


def measure(url: str, started: float, args: argparse.Namespace, alive: Callable[[], None]) -> dict[str, Any]:
    """Waits for the frontend (`alive` raises when the runner died), warms up, then drives the load."""
    deadline = started + READY_TIMEOUT_S
    while True:
        alive()
        try:
            if request(url + "/healthz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.3)
    ready = time.monotonic() - started
    for _ in range(args.warmup):
        complete(url, args.max_tokens)
    return {"ready_s": ready, **drive(url, args.clients, args.requests, args.max_tokens)}


def process_group(path: Path, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The ranks as `python -m k2_workers.serve` processes, one env:// group each, then the frontend across them."""
    groups, ranks = int(spec["groups"]), int(spec["ranksPerGroup"])
    flags = ["--config", str(path), "--seed", "0", "--metrics-port", "-1", "--grpc-port", "-1"]
    argvs, envs, urls = [], [], []
    for group in range(groups):
        master, ports = free_port(), [free_port() for _ in range(ranks)]
        urls.append(f"http://{LOOPBACK}:{ports[0]}")
        for rank, port in enumerate(ports):
            argvs.append([*flags, "--port", str(port)])
            envs.append(
                clean_env()
                | {"RANK": str(rank), "WORLD_SIZE": str(ranks), "K2_GROUP": str(group)}
                | {"MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(master)}
            )
    started = time.monotonic()
    with serve_processes(argvs, envs) as workers:
        for url, worker in zip(urls, workers[::ranks], strict=True):
            wait_healthy(url, worker, timeout_s=READY_TIMEOUT_S)
        port = free_port()
        frontend_argv = ["--frontend", "--port", str(port), "--grpc-port", "-1", "--endpoints", ",".join(urls)]
        with serve_processes([frontend_argv], [clean_env()]) as (frontend,):

            def alive() -> None:
                for process in [*workers, frontend]:
                    if process.poll() is not None:
                        raise RuntimeError(f"a process of the group exited with {process.returncode}")

            return measure(f"http://{LOOPBACK}:{port}", started, args, alive)


def ray_run(path: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """`k2 run -f` on a local Ray instance, stopped with SIGINT (its Ctrl-C) after the load."""
    port = free_port()
    command = [sys.executable, "-m", "k2_api.cli", "run", "-f", str(path), "--port", str(port)]
    with open(log, "w") as stderr:
        started = time.monotonic()
        proc = subprocess.Popen(command, env=clean_env(), stdout=stderr, stderr=stderr, text=True)

        def alive() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"k2 run exited {proc.returncode}: see {log}")

        try:
            return measure(f"http://{LOOPBACK}:{port}", started, args, alive)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests before the load")
    parser.add_argument("--groups", type=int, help="override spec.groups of the example")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="k2-ray-serve-bench-") as tmp:
        work = Path(tmp)
        path, spec = manifest(work, args.groups)
        shape = f"{spec['groups']} x {spec['ranksPerGroup']}"
        rows = [
            {"runner": f"process group ({shape} + frontend)", **process_group(path, spec, args)},
            {"runner": f"k2 run (Ray, {shape})", **ray_run(path, args, work / "ray.log")},
        ]
    base = rows[0]
    for row in rows:
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["p50_ratio"] = row["p50_s"] / base["p50_s"]
        row["ready_ratio"] = row["ready_s"] / base["ready_s"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'runner':<34} {'ready s':>8} {'tok/s':>7} {'x':>5} {'p50 s':>6} {'p99 s':>6} {'x p50':>5} {'load':>5}")
    for row in rows:
        print(
            f"{row['runner']:<34} {row['ready_s']:>8.1f} {row['tokens_per_s']:>7.1f} {row['tokens_per_s_ratio']:>5.2f} "
            f"{row['p50_s']:>6.2f} {row['p99_s']:>6.2f} {row['p50_ratio']:>5.2f} {row['load_avg_1m']:>5.1f}"
        )


if __name__ == "__main__":
    main()
