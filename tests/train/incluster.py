"""Rank 0 of a training pod, as seen from the API server: a ServiceAccount directory (token, CA, namespace) with
the worker Role's permissions and the env the operator sets, for tests that run the real status reporter here."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import urlparse

import yaml

from tests.support.cluster import Cluster

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


def as_trainer(cluster: Cluster, namespace: str, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The env and ServiceAccount directory of rank 0 in a pod of the K2Training `train-test` (created here), with
    the worker Role's permissions."""
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
    return env, service_account
