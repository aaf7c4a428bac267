"""The local cluster's storage: a default StorageClass and a pool of static local PersistentVolumes on the real node.

Why static `local` volumes rather than a dynamic provisioner:
- kube-controller-manager's built-in host-path provisioner (`--enable-hostpath-provisioner`) always provisions under
  `/tmp/hostpath_pv/<uid>` (no flag moves it, so `make cluster-down` would not own it), makes each directory root-owned
  with mode 0750, and hostPath volumes get no fsGroup: the project's pods, which run as uid 1000, could neither read
  nor write it.
- rancher's local-path-provisioner creates directories through helper pods that pull `busybox` from a registry,
  which this machine cannot reach.
- A `local` volume is Kubernetes' own node-local storage: the kubelet bind-mounts the directory and, for a writable
  mount, hands it to the pod's fsGroup, so a non-root pod can write its checkpoints there. The scheduler places
  the consumer on the volume's node (`volumeBindingMode: WaitForFirstConsumer`), here the real node.

`ensure` creates the StorageClass `k2-local` (the cluster's default) and `POOL_SIZE` volumes of `CAPACITY` each,
backed by `volumes/<name>/` in the cluster directory (removed with it by `down`). The volumes are `Retain`: a
released volume (its claim deleted) keeps its data until the next `ensure`, which `up` runs also on a running
cluster: it then empties the directory and makes the volume Available again (`recycle_released`).
"""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path
from typing import Any

from . import api
from .errors import ClusterError
from .layout import Layout, State

STORAGE_CLASS = "k2-local"
NO_PROVISIONER = "kubernetes.io/no-provisioner"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
POOL_SIZE = 16
CAPACITY = "10Gi"  # nominal: a local volume is as large as the disk under it
VOLUME_PREFIX = "k2-local-"
VOLUME_MODE = 0o777  # any pod user may read and write (a writable mount is also handed to the pod's fsGroup)
LABELS = {"app.kubernetes.io/managed-by": "k2-local-cluster"}


def volumes_dir(layout: Layout) -> Path:
    """Where the pool's directories live: inside the cluster directory, so `down` removes them."""
    return layout.root / "volumes"


def storage_class() -> dict[str, Any]:
    """The default StorageClass of the local cluster: static local volumes, bound where their consumer is scheduled."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "labels": LABELS, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
        "provisioner": NO_PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }


def local_volume(
    name: str, path: Path, node: str, capacity: str = CAPACITY, storage_class_name: str = STORAGE_CLASS
) -> dict[str, Any]:
    """A `local` PersistentVolume: directory `path` on node `node`, ReadWriteOnce, kept when its claim goes."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": LABELS},
        "spec": {
            "capacity": {"storage": capacity},
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class_name,
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}
                    ]
                }
            },
        },
    }


def pool(layout: Layout, node: str, size: int = POOL_SIZE) -> list[dict[str, Any]]:
    """The pool's volumes, `k2-local-00` ... on `node`."""
    return [
        local_volume(f"{VOLUME_PREFIX}{index:02d}", volumes_dir(layout) / f"{VOLUME_PREFIX}{index:02d}", node)
        for index in range(size)
    ]


def ensure(layout: Layout, state: State, node: str, size: int = POOL_SIZE) -> None:
    """Creates the StorageClass and the pool's directories and volumes; what exists already is kept (idempotent)."""
    volumes = pool(layout, node, size)
    for volume in volumes:
        directory = Path(volume["spec"]["local"]["path"])
        if not directory.is_dir():  # an existing one may be in use (the kubelet gave it to a pod's fsGroup)
            directory.mkdir(parents=True)
            directory.chmod(VOLUME_MODE)
    _create(layout, state, "/apis/storage.k8s.io/v1/storageclasses", storage_class())
    for volume in volumes:
        _create(layout, state, "/api/v1/persistentvolumes", volume)
    recycle_released(layout, state)


def recycle_released(layout: Layout, state: State) -> list[str]:
    """Empties the directory of every pool volume whose claim is gone (phase Released) and drops its claimRef, so
    that the PV controller offers it again; returns their names. Volumes outside `volumes_dir` are left alone."""
    selector = urllib.parse.quote(",".join(f"{k}={v}" for k, v in LABELS.items()))
    status, body = api.api_request(layout, state, "GET", f"/api/v1/persistentvolumes?labelSelector={selector}")
    if status != 200:
        raise ClusterError(f"listing the pool's PersistentVolumes failed with HTTP {status}: {body}")
    recycled = []
    for volume in body["items"]:
        directory = Path(volume["spec"].get("local", {}).get("path", "/"))
        if volume.get("status", {}).get("phase") != "Released" or directory.parent != volumes_dir(layout):
            continue
        _empty(directory)
        name = volume["metadata"]["name"]
        patch = {"spec": {"claimRef": None}}
        path = f"/api/v1/persistentvolumes/{name}"
        status, answer = api.api_request(layout, state, "PATCH", path, patch, "application/merge-patch+json")
        if status != 200:
            raise ClusterError(f"releasing PersistentVolume {name} failed with HTTP {status}: {answer}")
        recycled.append(name)
    return recycled


def _empty(directory: Path) -> None:
    """Removes everything inside `directory` and gives it back its pool mode (the kubelet may have changed it)."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    directory.chmod(VOLUME_MODE)


def _create(layout: Layout, state: State, path: str, body: dict[str, Any]) -> None:
    status, answer = api.api_request(layout, state, "POST", path, body)
    if status not in (201, 409):
        raise ClusterError(f"creating {body['kind']} {body['metadata']['name']} failed with HTTP {status}: {answer}")
