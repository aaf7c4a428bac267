"""Rank 0's progress reaches a real K2Training status through the status subresource, with a ServiceAccount token;
a checkpoint fallback it reports becomes the operator's Warning event."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from k2_workers.train import loop
from k2_workers.train.config import RunConfig
from k2_workers.train.loop import train
from k2_workers.train.status import progress_record, reporter_from_env
from tests.operator.harness import running_operator
from tests.support.cluster import Cluster
from tests.support.kube import items
from tests.support.waits import wait_for
from tests.train.incluster import as_trainer

pytestmark = pytest.mark.integration


def test_progress_is_written_to_the_k2training_status(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    kubectl = cluster.kubectl
    env, service_account = as_trainer(cluster, namespace, tmp_path)
    reporter = reporter_from_env(env, min_interval_s=0, service_account_dir=service_account)
    assert reporter is not None
    progress = progress_record(12, 3.25, 4321.0, 17.5, "/checkpoints/step-10", 10)
    reporter.report(progress, force=True)
    reporter.close()

    status = json.loads(kubectl("get", "k2training", "train-test", "-n", namespace, "-o", "json").stdout)["status"]
    assert status["progress"] == {k: v for k, v in progress.items() if v is not None}  # null: cleared

    # A resume that fell back: the CRD keeps the whole record; the next gang's clean resume (null) removes it.
    fallback = {
        "resumedFrom": "/checkpoints/step-10",
        "resumedStep": 10,
        "skipped": [{"step": 20, "path": "/checkpoints/step-20", "reason": "tensors.safetensors: SHA-256 differs"}],
    }
    for record, expected in ((fallback, fallback), (None, None)):
        reporter = reporter_from_env(env, min_interval_s=0, service_account_dir=service_account)
        assert reporter is not None
        reporter.report(progress_record(12, 3.25, 4321.0, 17.5, checkpoint_fallback=record), force=True)
        reporter.close()
        stored = json.loads(kubectl("get", "k2training", "train-test", "-n", namespace, "-o", "json").stdout)
        assert stored["status"]["progress"].get("checkpointFallback") == expected


def test_a_trainer_that_falls_back_makes_the_operator_post_a_warning_event(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole chain on the real API server: the tree's trainer resumes past a truncated checkpoint and reports it
    with its ServiceAccount; the operator (a subprocess on this namespace) posts the CheckpointFallback event."""
    ckpt = tmp_path / "ckpt"
    cfg = {"seq_len": 32, "micro_batch_size": 2, "warmup_steps": 1, "decay_steps": 2, "device": "cpu"}
    cfg |= {"checkpoint_dir": str(ckpt), "steps": 6, "checkpoint_every": 2, "keep_last": 3}
    assert train(RunConfig(**cfg, stop_after=4), io.StringIO()) == 0
    newest = ckpt / "step-4" / "tensors.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])

    env, service_account = as_trainer(cluster, namespace, tmp_path)
    monkeypatch.setattr(
        loop, "reporter_from_env", lambda min_interval_s: reporter_from_env(env, 0, service_account_dir=service_account)
    )
    with running_operator(cluster, namespace, tmp_path) as operator:
        assert train(RunConfig(**cfg), io.StringIO()) == 0

        def warning() -> dict[str, Any] | None:
            events = items(cluster, "events", namespace=namespace)
            return next((e for e in events if e["reason"] == "CheckpointFallback"), None)

        event = wait_for("the CheckpointFallback event", warning, 60)
        assert operator.errors() == [], operator.logs()
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "train-test"
    assert event["message"].startswith(f"resumed from step 2 ({ckpt}/step-2); skipped step 4 at {ckpt}/step-4 (")
    assert "tensors.safetensors" in event["message"], event["message"]
    stored = json.loads(cluster.kubectl("get", "k2training", "train-test", "-n", namespace, "-o", "json").stdout)
    assert stored["status"]["progress"]["checkpointFallback"]["resumedStep"] == 2
