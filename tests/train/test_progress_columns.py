"""`kubectl get k2t` on the real API server shows what rank 0 writes: step/steps, loss, tokens/s, age, and with
`-o wide` the checkpoint and the export (`status.export`, written by `report_export` with a ServiceAccount token)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from k2_workers.train.export import export_record, report_export
from k2_workers.train.status import progress_record, reporter_from_env
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).parent / "k2training-test.yaml"  # metadata.name: train-test, spec.steps: 30

ROLE = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: k2-trainer}
rules:
- apiGroups: [k2.ai]
  resources: [k2trainings/status]
  verbs: [get, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: k2-trainer}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: k2-trainer}
subjects:
- {kind: ServiceAccount, name: trainer}
"""


def _pod_identity(cluster: Cluster, namespace: str, directory: Path) -> dict[str, str]:
    """What a training pod sees: a ServiceAccount directory (token, CA, namespace) and the env the operator sets."""
    kubectl = cluster.kubectl
    kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    kubectl("apply", "-n", namespace, "-f", "-", input=ROLE)
    directory.mkdir()
    (directory / "token").write_text(kubectl("create", "token", "trainer", "-n", namespace).stdout.strip())
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ca_data = kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
    (directory / "ca.crt").write_bytes(base64.b64decode(ca_data))
    (directory / "namespace").write_text(namespace)
    server = urlparse(cluster.server)
    return {
        "KUBERNETES_SERVICE_HOST": server.hostname or "",
        "KUBERNETES_SERVICE_PORT": str(server.port),
        "K2_TRAINING_NAME": "train-test",
    }


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
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=MANIFEST.read_text())
    service_account = tmp_path / "serviceaccount"
    env = _pod_identity(cluster, namespace, service_account)

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
