"""The worker pods' thin client to the Kubernetes API: JSON merge patches with the pod's ServiceAccount.

Used where a worker reports to the control plane. In a pod it reads KUBERNETES_SERVICE_HOST/PORT (set by Kubernetes)
and the mounted ServiceAccount token and CA; anywhere else `from_env` returns None and callers skip reporting.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2_api.contract import Env

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class InClusterClient:
    server: str
    namespace: str
    token_file: Path | None
    ca_file: Path | None
    timeout_s: float = 5.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] = os.environ, service_account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> InClusterClient | None:
        host = env.get("KUBERNETES_SERVICE_HOST")
        namespace = env.get(Env.NAMESPACE)
        if namespace is None and (service_account_dir / "namespace").is_file():
            namespace = (service_account_dir / "namespace").read_text().strip()
        if not (host and namespace):
            return None
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token, ca = service_account_dir / "token", service_account_dir / "ca.crt"
        return cls(server, namespace, token if token.is_file() else None, ca if ca.is_file() else None)

    def merge_patch(self, path: str, body: dict[str, Any]) -> None:
        """PATCH `path` (e.g. /api/v1/namespaces/ns/pods/p) with a JSON merge patch; the token is re-read each time
        because it rotates."""
        request = urllib.request.Request(self.server + path, data=json.dumps(body).encode(), method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        if self.token_file is not None:
            request.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file is not None else None
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
            response.read()
