"""Puts a local checkpoint directory on a PersistentVolumeClaim of the cluster, for `spec.model.checkpointUri:
pvc://<claim>/<path>`: a short-lived loader pod mounts the claim and `kubectl cp` copies the files in. It works on any
cluster with a default StorageClass (the local cluster's, kind's), since nothing writes to a node's disk directly."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from liveloop.kubectl import Kubectl
from liveloop.system import Image, wait_for

MOUNT = "/mnt/claim"


def claim(name: str, size: str = "1Gi") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


def loader_pod(name: str, claim_name: str, image: Image, node_selector: Mapping[str, str]) -> dict[str, Any]:
    """A pod that only holds the claim mounted read-write, for `kubectl cp` (the image has tar)."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "containers": [
            {
                "name": "loader",
                "image": image.ref,
                "imagePullPolicy": image.pull_policy,
                "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "claim", "mountPath": MOUNT}],
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
            }
        ],
        "volumes": [{"name": "claim", "persistentVolumeClaim": {"claimName": claim_name}}],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def upload(
    kubectl: Kubectl,
    namespace: str,
    local_dir: Path,
    claim_name: str,
    path: str,
    image: Image,
    node_selector: Mapping[str, str],
    timeout_s: float = 240.0,
) -> str:
    """Copies `local_dir` to `<claim>/<path>` (creating the claim) and returns its `pvc://` URI."""
    kubectl.apply(claim(claim_name), namespace)
    pod = f"{claim_name}-loader"
    kubectl.apply(loader_pod(pod, claim_name, image, node_selector), namespace)
    try:
        wait_for(
            f"pod {pod} Running",
            lambda: kubectl.get(f"pod/{pod}", namespace=namespace).get("status", {}).get("phase") == "Running",
            timeout_s,
        )
        kubectl.run("exec", f"--namespace={namespace}", pod, "--", "mkdir", "-p", f"{MOUNT}/{path}")
        for file in sorted(local_dir.iterdir()):
            kubectl.run("cp", str(file), f"{namespace}/{pod}:{MOUNT}/{path}/{file.name}", timeout_s=timeout_s)
        # tar keeps each file's mode, and the ranks run as another user: a checkpoint written 0600 (as safetensors
        # alone writes) would be unreadable to them.
        kubectl.run("exec", f"--namespace={namespace}", pod, "--", "chmod", "-R", "a+rX", f"{MOUNT}/{path}")
        listing = kubectl.run("exec", f"--namespace={namespace}", pod, "--", "ls", f"{MOUNT}/{path}")
        missing = {f.name for f in local_dir.iterdir()} - set(listing.split())
        if missing:
            raise RuntimeError(f"kubectl cp left out {sorted(missing)}: {json.dumps(listing)}")
    finally:
        kubectl.run("delete", "pod", pod, f"--namespace={namespace}", "--wait=true", "--ignore-not-found")
    return f"pvc://{claim_name}/{path}"
