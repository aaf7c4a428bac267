"""`kubectl get k2t` on the real API server shows what rank 0 writes: step/steps, loss, tokens/s, age, and with
`-o wide` the checkpoint and the export (`status.export`, written by `report_export` with a ServiceAccount token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2_workers.train.export import export_record, report_export
from k2_workers.train.status import progress_record, reporter_from_env
from tests.support.cluster import Cluster
from tests.train.incluster import as_trainer

pytestmark = pytest.mark.integration


def _table(cluster: Cluster, namespace: str, *flags: str) -> dict[str, str]:
    """The one row of `kubectl get k2t`, keyed by column header."""
    lines = cluster.kubectl("get", "k2t", "-n", namespace, *flags).stdout.splitlines()
    assert len(lines) == 2, lines
    header, row = lines[0].split(), lines[1].split()
    assert len(header) == len(row), lines
    return dict(zip(header, row, strict=True))


def test_kubectl_get_k2t_shows_progress_and_the_export(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    env, service_account = as_trainer(cluster, namespace, tmp_path)

    reporter = reporter_from_env(env, min_interval_s=0, service_account_dir=service_account)
    assert reporter is not None
    reporter.report(progress_record(12, 3.25, 4321.0, 17.5, "/checkpoints/step-10", 10), force=True)
    reporter.close()
    row = _table(cluster, namespace)
    assert list(row) == ["NAME", "READY", "STEP", "STEPS", "LOSS", "TOKENS/S", "RESTARTS", "AGE"]
    assert (row["NAME"], row["STEP"], row["STEPS"], row["LOSS"], row["TOKENS/S"]) == (
        "train-test",
        "12",
        "30",
        "3.25",
        "4321",
    )
    assert row["AGE"][-1] in "smhd"

    record = export_record("pvc://ckpt/export", 30, "fp32")
    assert report_export(record, env, service_account)
    status = json.loads(cluster.kubectl("get", "k2t", "train-test", "-n", namespace, "-o", "json").stdout)["status"]
    assert status["export"] == record
    assert status["progress"]["step"] == 12  # the export's patch leaves progress alone
    wide = _table(cluster, namespace, "-o", "wide")
    assert (wide["CHECKPOINT"], wide["EXPORT"]) == ("/checkpoints/step-10", "pvc://ckpt/export")
