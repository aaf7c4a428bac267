"""K2Training through real pods on the real node: exact resume after a deleted pod, suspend and resume, a crash.

Each training is a gang of two worker pods (one rank each) on `real-node-0`, checkpointing to a PersistentVolumeClaim
bound to a static hostPath PersistentVolume in this test's tmp directory (the real node runs on this machine, so
both pods share the directory and the test reads the checkpoints' safetensors files directly). The operator is the
tree's (tests/operator/harness.py); the pods run the worker image that `make image` built.

Timeouts are generous and documented, never asserted: a gang's start (scheduling, torch import, model build, gloo
rendezvous) takes about 10 s on an idle machine and minutes on a shared one, a k2-debug step 0.1 s to several.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from k2_api.contract import ExitCodes, Labels
from tests.cluster.real_node import has_real_node, skip_unless_a_real_node_can_run
from tests.operator.harness import running_operator
from tests.operator.resources import example
from tests.support.cluster import Cluster
from tests.support.kube import apply, condition, get, items, patch
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration

STEPS = 32
CHECKPOINT_EVERY = 4
# A gang's start on a loaded 2-core machine: scheduling, the image's torch import, model build, gloo rendezvous, and
# the first steps (over 5 minutes to a first checkpoint with the machine's load average at 30).
START_TIMEOUT_S = 900
# A whole run: up to three gang starts (a restart included) and STEPS k2-debug steps beside another gang. A
# machine shared by several test sessions (load average 30 on 2 cores) took 15 minutes for 40 steps of 256 tokens.
RUN_TIMEOUT_S = 1200
GRACE_S = 180  # the deleted pod's terminationGracePeriod: its rank finishes the step and checkpoints
STORAGE_CLASS = ""  # static binding only: no provisioner (nor a default StorageClass) may claim these PVCs


@pytest.fixture
def real(cluster: Cluster, k2_crds: list[str]) -> Iterator[Cluster]:
    """The session's cluster with its real node (skips, or fails under CI, where none can run)."""
    if not has_real_node(cluster):
        skip_unless_a_real_node_can_run()
        skip_or_fail("the running cluster has no real node: `make cluster-down && make cluster-up` starts one")
    yield cluster


@pytest.fixture
def volumes(real: Cluster, namespace: str, tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`claim(name)`: a PVC `name` bound to a hostPath PV over a fresh directory, which it returns."""
    created: list[str] = []

    def claim(name: str) -> Path:
        host_dir = tmp_path / f"pv-{name}"
        host_dir.mkdir()
        host_dir.chmod(0o777)  # the workers run as a non-root user; hostPath ignores fsGroup
        volume = f"{namespace}-{name}"
        apply(real, _volume(volume, host_dir, namespace, name))
        created.append(volume)
        apply(real, _claim(name, volume), namespace=namespace)
        wait_for(f"PVC {name} Bound", lambda: _phase(real, namespace, name) == "Bound", 60)
        return host_dir

    yield claim
    for volume in created:
        real.kubectl("delete", "pv", volume, "--wait=false", "--ignore-not-found", check=False)


def _volume(name: str, host_dir: Path, namespace: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"k2.ai/test": "true"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": str(host_dir), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": claim},  # pre-bound: no other claim can take it
        },
    }


def _claim(name: str, volume: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": STORAGE_CLASS,
            "volumeName": volume,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }


def _phase(cluster: Cluster, namespace: str, claim: str) -> str | None:
    body = get(cluster, f"pvc/{claim}", namespace=namespace, missing_ok=True)
    return None if body is None else body.get("status", {}).get("phase")


def _training(name: str, claim: str, **spec: Any) -> dict[str, Any]:
    """The debug example as a 2-pod gang on the real node, STEPS steps, checkpoints every CHECKPOINT_EVERY steps on
    `claim`. Same seed (spec.data.seed 0) for every training of these tests."""
    body = example("k2training-debug.yaml")
    body["metadata"]["name"] = name
    body["spec"] |= {
        "steps": STEPS,
        "scheduling": {"nodeSelector": {"type": "real"}},
        # The real node's 2 CPUs and 8 fake GPUs are shared with other tests' pods: no GPU (the ranks train on the
        # CPU), a quarter CPU each (request and limit; without a request a pod's CPU weight is the minimum, and it
        # starves while other pods are busy), and no memory bound.
        "gpusPerNode": 0,
        "procsPerNode": 1,
        "resources": {"cpu": "250m"},
        "data": {"corpus": "synthetic", "seqLen": 32, "batchSize": 2, "seed": 0},
        "checkpointing": {"claimName": claim, "everyNSteps": CHECKPOINT_EVERY, "keepLast": 3},
        "activeDeadlineSeconds": 3 * RUN_TIMEOUT_S,  # a guard only: the test's own waits fail first
        **spec,
    }
    return body


def _training_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get(cluster, f"k2training/{name}", namespace=namespace).get("status", {})
    return status


def _progress(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """status.progress as rank 0's trainer last wrote it ({} before its first report)."""
    progress: dict[str, Any] = _training_status(cluster, namespace, name).get("progress") or {}
    return progress


def _until(cluster: Cluster, namespace: str, name: str, type_: str, timeout_s: float) -> dict[str, Any]:
    """The K2Training once its condition `type_` is True; fails early, with the reason, if it Failed instead."""

    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = get(cluster, f"k2training/{name}", namespace=namespace)
        failed = condition(body, "Failed")
        if type_ != "Failed" and failed is not None and failed["status"] == "True":
            raise AssertionError(f"{name} Failed: {failed['message']}")
        found = condition(body, type_)
        return body if found is not None and found["status"] == "True" else None

    result: dict[str, Any] = wait_for(f"{name} {type_}", probe, timeout_s)
    return result


def _pods(cluster: Cluster, namespace: str, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name}"
    if attempt is not None:
        selector += f",{Labels.ATTEMPT}={attempt}"
    return items(cluster, "pods", namespace=namespace, selector=selector)


def _rank0_log(cluster: Cluster, namespace: str, name: str, attempt: int) -> str:
    (pod,) = [p for p in _pods(cluster, namespace, name, attempt) if _completion_index(p) == "0"]
    return cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout


def _completion_index(pod: dict[str, Any]) -> str | None:
    index: str | None = pod["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index")
    return index


def _step_lines(log: str) -> list[dict[str, Any]]:
    """The JSON progress lines `k2 worker train` prints, one per optimizer step."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r for r in records if "step" in r]


def _resumed_step(log: str) -> int:
    match = re.search(r"resumed from (\S+) \(step (\d+)\)", log)
    assert match is not None, log[-3000:]
    return int(match.group(2))


def _wait_for_checkpoint(cluster: Cluster, namespace: str, name: str, at_least: int) -> dict[str, Any]:
    """status.progress once it names a checkpoint of step >= at_least (the trainer reports each checkpoint)."""
    result: dict[str, Any] = wait_for(
        f"{name}: status.progress.lastCheckpointStep >= {at_least}",
        lambda: (p := _progress(cluster, namespace, name)) and (p.get("lastCheckpointStep") or 0) >= at_least and p,
        START_TIMEOUT_S,
    )
    return result


def _final_tensors(host_dir: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of the checkpoint of step STEPS, read from the volume's directory."""
    final = host_dir / f"step-{STEPS}"
    assert (final / "COMPLETE").is_file(), sorted(p.name for p in host_dir.iterdir())
    return load_file(final / "tensors.safetensors")


def compare_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> tuple[int, float, list[str]]:
    """(tensors bitwise equal, max abs difference, names that differ) over the same names."""
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    differ = [k for k in expected if not torch.equal(expected[k], actual[k])]
    diffs = [(expected[k].double() - actual[k].double()).abs().max().item() for k in expected if expected[k].numel()]
    return len(expected) - len(differ), max(diffs, default=0.0), differ


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)  # two runs side by side; pyproject's 600 s is per test
def test_a_deleted_worker_pod_restarts_the_gang_which_resumes_bit_for_bit(
    real: Cluster, namespace: str, tmp_path: Path, volumes: Callable[[str], Path]
) -> None:
    """Two trainings with the same seed run side by side: one uninterrupted, one whose worker pod 1 is deleted
    mid-run. The deletion's SIGTERM makes the gang checkpoint and exit PREEMPTED; the operator starts the next
    attempt (a new Job, both pods), which resumes from that checkpoint. The final weights and optimizer state must
    be equal bit for bit."""
    reference_dir, resumed_dir = volumes("reference"), volumes("resumed")
    with running_operator(real, namespace, tmp_path) as operator:
        apply(real, _training("reference", "reference"), namespace=namespace)
        apply(real, _training("resumed", "resumed"), namespace=namespace)

        seen = _wait_for_checkpoint(real, namespace, "resumed", at_least=CHECKPOINT_EVERY)
        assert seen["step"] < STEPS and seen["loss"] > 0 and seen["tokensPerSecond"] > 0, seen
        assert seen["lastCheckpoint"] == f"/checkpoints/step-{seen['lastCheckpointStep']}", seen
        (worker,) = [p for p in _pods(real, namespace, "resumed", attempt=0) if _completion_index(p) == "1"]
        # A grace period that surely covers the step in progress and the checkpoint on a quarter CPU of a loaded
        # machine (a SIGKILL before the rank exits PREEMPTED would make it a crash, counted against maxRestarts).
        grace = f"--grace-period={GRACE_S}"
        real.kubectl("delete", "pod", "-n", namespace, worker["metadata"]["name"], grace, "--wait=false")

        restarted = _until(real, namespace, "resumed", "Succeeded", RUN_TIMEOUT_S)
        _until(real, namespace, "reference", "Succeeded", RUN_TIMEOUT_S)

        # Preempted once, restarted as a whole gang (attempt 1), and no restart counted against maxRestarts.
        status = restarted["status"]
        events = items(real, "events", namespace=namespace)
        restarting = [e["message"] for e in events if e["reason"] == "Restarting"]
        assert (status["preemptions"], status["restarts"]) == (1, 0), restarting
        log = _rank0_log(real, namespace, "resumed", attempt=1)
        resumed_at = _resumed_step(log)
        assert seen["step"] <= resumed_at < STEPS, (seen, resumed_at)
        lines = _step_lines(log)
        assert [r["step"] for r in lines] == list(range(resumed_at + 1, STEPS + 1))
        # The Restarting event names the preemption: the checkpoint it wrote on SIGTERM when a pod that exited
        # PREEMPTED is still there to tell, else the Job's podFailurePolicy message (which rule, which exit code).
        preempted = [m for m in restarting if m.startswith("attempt 0 preempted (1 so far, not counted)")]
        assert preempted and f"exit code {ExitCodes.PREEMPTED}" in preempted[0], restarting
        told = f"preempted at step {resumed_at}, checkpoint /checkpoints/step-{resumed_at}"
        assert told in preempted[0] or "matching FailJob rule" in preempted[0], restarting

        # status.progress is the trainer's: its last report is the last step line.
        for name in ("resumed", "reference"):
            progress = _progress(real, namespace, name)
            assert progress["step"] == STEPS and progress["lastCheckpointStep"] == STEPS, (name, progress)
        assert _progress(real, namespace, "resumed")["loss"] == pytest.approx(lines[-1]["loss"], abs=1e-6)
        assert operator.errors() == [], operator.logs()

    expected, actual = _final_tensors(reference_dir), _final_tensors(resumed_dir)
    equal, max_diff, differ = compare_tensors(expected, actual)
    model = sum(1 for k in expected if k.startswith("model."))
    print(
        f"\nbitwise comparison at step {STEPS} (resumed from step {resumed_at} after a pod deletion vs uninterrupted):"
        f" {equal}/{len(expected)} tensors equal ({model} model, {len(expected) - model} optimizer),"
        f" max abs diff {max_diff:.3g}"
    )
    assert differ == [] and max_diff == 0.0, differ[:10]


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_a_suspended_training_resumes_where_it_stopped(
    real: Cluster, namespace: str, tmp_path: Path, volumes: Callable[[str], Path]
) -> None:
    """spec.suspend deletes the pods (SIGTERM: checkpoint, exit PREEMPTED); unsuspending starts the gang again,
    which continues from that checkpoint to spec.steps."""
    volumes("suspended")
    with running_operator(real, namespace, tmp_path) as operator:
        apply(real, _training("suspended", "suspended"), namespace=namespace)
        _wait_for_checkpoint(real, namespace, "suspended", at_least=CHECKPOINT_EVERY)
        patch(real, "k2training/suspended", {"spec": {"suspend": True}}, namespace=namespace)
        _until(real, namespace, "suspended", "Suspended", START_TIMEOUT_S)
        wait_for("the suspended gang's pods gone", lambda: not _pods(real, namespace, "suspended"), START_TIMEOUT_S)
        stopped = _progress(real, namespace, "suspended")
        # The last report is the checkpoint written on SIGTERM: nothing trained after it.
        assert stopped["lastCheckpointStep"] == stopped["step"] < STEPS, stopped

        patch(real, "k2training/suspended", {"spec": {"suspend": False}}, namespace=namespace)
        done = _until(real, namespace, "suspended", "Succeeded", RUN_TIMEOUT_S)
        attempt = done["status"]["restarts"] + done["status"]["preemptions"]
        log = _rank0_log(real, namespace, "suspended", attempt)
        assert _resumed_step(log) == stopped["step"]
        assert [r["step"] for r in _step_lines(log)] == list(range(stopped["step"] + 1, STEPS + 1))
        assert done["status"]["restarts"] == 0, done["status"]
        assert _progress(real, namespace, "suspended")["step"] == STEPS
        assert operator.errors() == [], operator.logs()


def test_a_crash_past_max_restarts_fails_naming_the_cause(real: Cluster, namespace: str, tmp_path: Path) -> None:
    """A corpus path that does not exist: every rank raises before its first step; the gang restarts once
    (maxRestarts 1), fails again, and Failed carries the pod's termination message."""
    missing = "file:///k2-test-no-such-corpus"
    body = _training("crashing", "unused", data={"uri": missing, "seqLen": 32, "batchSize": 2})
    body["spec"]["checkpointing"] = {"everyNSteps": CHECKPOINT_EVERY}  # an emptyDir: nothing is ever written
    body["spec"]["failurePolicy"] = {"maxRestarts": 1}
    with running_operator(real, namespace, tmp_path) as operator:
        apply(real, body, namespace=namespace)
        failed = _until(real, namespace, "crashing", "Failed", RUN_TIMEOUT_S)
        status = failed["status"]
        message = condition(failed, "Failed")
        assert message is not None and message["reason"] == "MaxRestartsExceeded", message
        assert status["restarts"] == 1 and status["preemptions"] == 0, status
        text = message["message"]
        assert f"exit code {ExitCodes.CRASHED}" in text, text
        assert "ValueError: dataset: /k2-test-no-such-corpus has no index.json" in text, text
        assert "maxRestarts=1" in text, text
        print(f"\nFailed: {text}")
        assert operator.errors() == [], operator.logs()
