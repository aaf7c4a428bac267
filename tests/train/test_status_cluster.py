"""Rank 0's progress reaches a real K2Training status through the status subresource, with a ServiceAccount token."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from k2_workers.train.status import progress_record, reporter_from_env
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration

MANIFEST = Path(__file__).parent / "k2training-test.yaml"  # metadata.name: train-test

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


def test_progress_is_written_to_the_k2training_status(
    cluster: Cluster, namespace: str, k2_crds: list[str], tmp_path: Path
) -> None:
    kubectl = cluster.kubectl
    kubectl("apply", "-n", namespace, "-f", "-", input=MANIFEST.read_text())
    kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    kubectl("apply", "-n", namespace, "-f", "-", input=ROLE)
    token = kubectl("create", "token", "trainer", "-n", namespace).stdout.strip()

    service_account = tmp_path / "serviceaccount"  # what a pod sees under /var/run/secrets/kubernetes.io/
    service_account.mkdir()
    (service_account / "token").write_text(token)
    kubeconfig = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ca_data = kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"]
    (service_account / "ca.crt").write_bytes(base64.b64decode(ca_data))
    (service_account / "namespace").write_text(namespace)
    server = urlparse(cluster.server)
    env = {
        "KUBERNETES_SERVICE_HOST": server.hostname or "",
        "KUBERNETES_SERVICE_PORT": str(server.port),
        "K2_TRAINING_NAME": "train-test",
    }

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
