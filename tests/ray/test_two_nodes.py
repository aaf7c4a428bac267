"""`k2 run --address` on a two-node Ray cluster (both nodes on loopback, 1 CPU each): a gang of 2 ranks placed
STRICT_SPREAD, one rank per node, trains to the end; the cluster's processes listen on loopback only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray.train  # noqa: F401  the test extra installs ray: a missing install fails here, never skips

from k2_api.contract import ExitCodes
from tests.support.listeners import LOOPBACK_HEX, listening_addresses
from tests.train.launch import base_env

from .run import k2_run, manifest

pytestmark = pytest.mark.distributed


def test_a_gang_spread_over_two_nodes_trains(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="k2r", dir="/tmp")  # short: Ray's unix socket paths live under it
    cluster = subprocess.Popen(
        [sys.executable, "-m", "tests.ray.two_nodes", temp_dir],
        env=base_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cluster.stdout is not None
        address = cluster.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        assert listening_addresses(cluster.pid) <= LOOPBACK_HEX
        path = manifest(tmp_path, steps=8, every=4)
        run = k2_run(path, tmp_path / "runs", "--address", address, "--placement-strategy", "STRICT_SPREAD")
        assert run.returncode == ExitCodes.SUCCEEDED, run.stderr[-4000:]
        assert run.steps == list(range(1, 9))  # STRICT_SPREAD with 1 CPU per node: placed only as one rank per node
    finally:
        assert cluster.stdin is not None
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
