"""Start time and memory of the serving frontend (`k2 worker serve --frontend`).

Starts the frontend `--runs` times as its own process, routing to one group URL that nothing listens on (the
frontend answers /healthz without asking its groups), and measures for each run the time from process start to the
first 200 from /healthz, and the process's resident memory (VmRSS from /proc/PID/status) at that moment. Prints
the medians, and whether the frontend imported `torch` (one more start under `python -X importtime`, which is not
timed since that flag slows the imports).

    python benchmarks/frontend_start.py                 # 5 runs
    python benchmarks/frontend_start.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Start:
    seconds: float
    rss_kib: int
    imports_torch: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_once(timeout_s: float, importtime: bool = False) -> Start:
    port, group = free_port(), free_port()
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "k2_workers.serve", "--frontend"]
    argv += ["--host", "127.0.0.1"]
    argv += ["--port", str(port), "--endpoints", f"http://127.0.0.1:{group}"]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: -X importtime writes more than a pipe holds
        begin = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            deadline = begin + timeout_s
            while not healthy(f"http://127.0.0.1:{port}/healthz"):
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"frontend exited with {process.returncode}: {log.read()}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"frontend not healthy after {timeout_s}s")
                time.sleep(0.005)
            seconds = time.perf_counter() - begin
            rss = rss_kib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        log.seek(0)
        stderr = log.read()
    # -X importtime writes one line per imported module: "import time: self | cumulative | name"
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return Start(seconds, rss, "torch" in imported)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs: must be >= 1, got {args.runs}")
    starts = [start_once(args.timeout_s) for _ in range(args.runs)]
    for index, start in enumerate(starts):
        print(f"run {index}: {start.seconds:.3f} s to first /healthz 200, VmRSS {start.rss_kib / 1024:.1f} MiB")
    seconds = statistics.median(s.seconds for s in starts)
    rss = statistics.median(s.rss_kib for s in starts) / 1024
    imports_torch = start_once(args.timeout_s, importtime=True).imports_torch
    print(f"median over {args.runs} runs: start {seconds:.3f} s, VmRSS {rss:.1f} MiB; imports torch: {imports_torch}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load})")


if __name__ == "__main__":
    main()
