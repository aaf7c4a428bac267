"""GitOps cleanliness on the real API server: after the operator reconciled the examples, re-applying them with
server-side apply changes nothing (`kubectl diff --server-side` is empty, the generation stays), and no field
manager but the user's owns anything under `spec`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.harness import Operator, running_operator
from tests.operator.resources import kwok_example
from tests.support.cluster import Cluster
from tests.support.kube import get
from tests.support.waits import wait_for

GITOPS = "gitops-sync"  # the user's field manager, as Argo CD's or Flux's
LONG_RUN = {"k2.ai/fake-run-duration": "600s"}  # kwok keeps the training's pods Running
RESOURCES = ("k2serving/k2-debug-serve", "k2training/k2-debug-train")


def manifests() -> list[dict[str, Any]]:
    serving = kwok_example("k2serving-debug.yaml")
    training = kwok_example("k2training-debug.yaml")
    training["metadata"]["annotations"] = LONG_RUN
    return [serving, training]


def write(documents: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents))
    return path


def sync(cluster: Cluster, namespace: str, path: Path) -> None:
    cluster.kubectl("apply", "--server-side", f"--field-manager={GITOPS}", "-n", namespace, "-f", str(path))


def diff(cluster: Cluster, namespace: str, path: Path) -> tuple[int, str]:
    """`kubectl diff --server-side`: exit code 0 (no drift) or 1 (drift, shown), anything else is an error."""
    argv = ["diff", "--server-side", f"--field-manager={GITOPS}", "-n", namespace, "-f", str(path)]
    result = cluster.kubectl(*argv, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, result.stdout


def reconciled(cluster: Cluster, namespace: str) -> bool:
    """Both resources report on their current generation, and their children exist."""
    for ref in RESOURCES:
        obj = get(cluster, ref, namespace=namespace)
        if (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]:
            return False
    children = cluster.kubectl("get", "statefulsets,jobs,expertplacements", "-n", namespace, "-o", "name").stdout
    return "expertplacement.k2.ai/k2-debug-serve" in children and "job.batch/" in children


def spec_managers(obj: dict[str, Any]) -> set[str]:
    """Field managers that own any field under `spec`."""
    return {e["manager"] for e in obj["metadata"].get("managedFields", []) if "f:spec" in e.get("fieldsV1", {})}


def user_entry(obj: dict[str, Any]) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [e for e in obj["metadata"]["managedFields"] if e["manager"] == GITOPS]
    (entry,) = entries
    return entry


def reconciles(operator: Operator) -> float:
    """Reconciles so far, summed over kinds and results."""
    samples = [line for line in operator.metrics().splitlines() if line.startswith("k2_operator_reconciles_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in samples)


@pytest.fixture
def operator(cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path) -> Iterator[Operator]:
    with running_operator(cluster, namespace, tmp_path) as running:
        yield running
    assert running.errors() == [], running.logs()


def test_reapplying_after_the_operator_reconciled_shows_no_drift(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    path = write(manifests(), tmp_path / "k2.yaml")
    sync(cluster, namespace, path)
    wait_for("both resources reconciled", lambda: reconciled(cluster, namespace), timeout_s=90)
    # A few resyncs (1 s in the harness): the operator's steady behaviour is part of what is compared.
    baseline = reconciles(operator)
    wait_for("three more resyncs", lambda: reconciles(operator) >= baseline + 6, timeout_s=30)
    before = {ref: get(cluster, ref, "--show-managed-fields", namespace=namespace) for ref in RESOURCES}

    code, shown = diff(cluster, namespace, path)
    assert (code, shown) == (0, ""), f"drift after the operator reconciled:\n{shown}"
    sync(cluster, namespace, path)
    for ref, old in before.items():
        new = get(cluster, ref, "--show-managed-fields", namespace=namespace)
        assert new["metadata"]["generation"] == old["metadata"]["generation"] == 1, ref
        assert user_entry(new) == user_entry(old), f"{ref}: the second apply changed the user's fields"
        assert spec_managers(new) == {GITOPS}, f"{ref}: someone else owns part of spec: {spec_managers(new)}"

    # The diff can fail: a changed manifest shows up.
    changed = manifests()
    changed[0]["spec"]["eplb"]["cooldownSeconds"] = 120
    code, shown = diff(cluster, namespace, write(changed, tmp_path / "changed.yaml"))
    assert code == 1 and "cooldownSeconds: 120" in shown, shown
