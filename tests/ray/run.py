"""Running `k2 run` in tests: a subprocess per run (each starts its own local Ray instance, on loopback, 2 CPUs),
its stdout read line by line as it comes, so a test can act at a given step (SIGINT, kill a Ray Train worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.listeners import descends_from
from tests.train.launch import MANIFEST, base_env

K2_RUN = [sys.executable, "-m", "k2_api.cli", "run"]
TRAIN_WORKER = "ray::RayTrainWorker"  # the process title of a Ray Train worker actor


def manifest(tmp_path: Path, steps: int = 12, every: int = 4, **spec: Any) -> Path:
    """The debug example (2 ranks of k2-debug) with `steps` and checkpoints every `every` steps."""
    document = yaml.safe_load(MANIFEST.read_text())
    document["spec"].update(steps=steps, **spec)
    document["spec"]["checkpointing"]["everyNSteps"] = every
    path = tmp_path / "k2training.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@dataclass
class Run:
    returncode: int
    records: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""

    @property
    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records]


def k2_run(
    path: Path,
    storage: Path,
    *args: str,
    at_step: int | None = None,
    action: Callable[[subprocess.Popen[str]], None] | None = None,
    timeout_s: float = 420,
) -> Run:
    """`k2 run -f path --json --storage-path storage`; `action(proc)` once the driver printed step `at_step`."""
    env = base_env() | {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}  # a loaded 2-core machine starts slowly
    command = [*K2_RUN, "-f", str(path), "--json", "--storage-path", str(storage), "--num-cpus", "2", *args]
    stderr_file = storage.parent / f"{storage.name}.{len(list(storage.parent.glob('*.stderr')))}.stderr"
    with open(stderr_file, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        run = Run(returncode=-1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                run.records.append(json.loads(line))
                if action is not None and at_step is not None and run.records[-1]["step"] >= at_step:
                    action(proc)
                    action = None
            run.returncode = proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run.stderr = stderr_file.read_text()
    return run


def actor_pids(driver: subprocess.Popen[str], title: str = TRAIN_WORKER) -> list[int]:
    """The pids of the actors with this process title (default: Ray Train workers) under a driver (its local Ray
    instance's raylet starts them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline_title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if cmdline_title.startswith(title) and descends_from(int(entry.name), driver.pid):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # exited meanwhile
    return sorted(found)


def kill_one_train_worker(driver: subprocess.Popen[str]) -> None:
    """SIGKILL to the last-started Ray Train worker: a rank dies mid-run."""
    workers = actor_pids(driver)
    assert workers, "no Ray Train worker found under the driver"
    os.kill(workers[-1], signal.SIGKILL)
