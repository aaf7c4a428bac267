"""The local cluster's storage (hack/localcluster/storage.py): a default StorageClass and static local volumes.

The manifests are checked as data; then a control plane of the test's own (no real node) binds a claim that names no
class to a pool volume, through the real scheduler and PersistentVolume controller, on a kwok node standing in for
the real one. Mounting on the real node is tests/cluster/test_claims_real_node.py's.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import load_local_cluster, make_cluster
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

lc = load_local_cluster()
from localcluster import kubelet, storage  # noqa: E402  (on sys.path once the entry script is loaded)


def test_the_default_class_binds_static_volumes_where_their_consumer_runs() -> None:
    sc = storage.storage_class()
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert sc["provisioner"] == "kubernetes.io/no-provisioner"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"


def test_the_pool_lives_in_the_cluster_directory_on_the_real_node(tmp_path: Path) -> None:
    layout = lc.Layout(tmp_path)
    volumes = storage.pool(layout, kubelet.NODE_NAME, size=3)
    assert [v["metadata"]["name"] for v in volumes] == ["k2-local-00", "k2-local-01", "k2-local-02"]
    for volume in volumes:
        spec = volume["spec"]
        assert Path(spec["local"]["path"]).parent == tmp_path / "volumes"  # `down` removes the cluster directory
        assert "hostPath" not in spec  # a local volume: the kubelet hands a writable mount to the pod's fsGroup
        assert spec["storageClassName"] == storage.STORAGE_CLASS
        assert spec["persistentVolumeReclaimPolicy"] == "Retain"
        (term,) = spec["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [kubelet.NODE_NAME]}
        ]


def _claim_and_pod(node: str) -> list[dict[str, Any]]:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "ckpt"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "consumer"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{"name": "main", "image": "registry.invalid/none:0"}],
            "volumes": [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
        },
    }
    return [claim, pod]


@pytest.mark.integration
def test_a_claim_without_a_class_binds_a_pool_volume(tmp_path: Path) -> None:
    if not (lc.TOOLS_BIN / "kube-apiserver").is_file():
        skip_or_fail("the control-plane binaries are not built: run `make tools`")
    root = tmp_path / "cluster"
    state = lc.up(root, num_nodes=1)
    try:
        layout = lc.Layout(root.resolve())
        node = "gpu-node-0"  # the kwok node plays the real one: the scheduler and the PV controller decide binding
        storage.ensure(layout, state, node, size=2)
        storage.ensure(layout, state, node, size=2)  # idempotent
        for directory in (root / "volumes").iterdir():
            assert stat.S_IMODE(directory.stat().st_mode) == storage.VOLUME_MODE
        cluster = make_cluster(layout.kubeconfig, state.server)
        cluster.kubectl("apply", "-n", "default", "-f", "-", input=yaml.safe_dump_all(_claim_and_pod(node)))

        def bound() -> dict[str, Any] | None:
            claim = json.loads(cluster.kubectl("get", "pvc", "ckpt", "-n", "default", "-o", "json").stdout)
            return claim if claim.get("status", {}).get("phase") == "Bound" else None

        claim = wait_for("the claim bound", bound, timeout_s=60)
        assert claim["spec"]["storageClassName"] == storage.STORAGE_CLASS  # the default class was applied
        assert claim["spec"]["volumeName"] in {"k2-local-00", "k2-local-01"}

        def scheduled() -> str | None:
            pod = json.loads(cluster.kubectl("get", "pod", "consumer", "-n", "default", "-o", "json").stdout)
            return pod["spec"].get("nodeName")  # type: ignore[no-any-return]

        assert wait_for("the consumer scheduled", scheduled, timeout_s=60) == node

        # The claim goes: its volume is Released with its data; the next ensure (an `up`) empties and frees it.
        volume_name = claim["spec"]["volumeName"]
        (root / "volumes" / volume_name / "left-behind").write_text("data of the deleted claim")
        cluster.kubectl("delete", "-n", "default", "pod/consumer", "pvc/ckpt", "--wait=true", "--timeout=60s")

        def phase() -> str:
            volume = json.loads(cluster.kubectl("get", "pv", volume_name, "-o", "json").stdout)
            return str(volume.get("status", {}).get("phase"))

        wait_for("the volume Released", lambda: phase() == "Released", timeout_s=60)
        storage.ensure(layout, state, node, size=2)
        wait_for("the volume Available again", lambda: phase() == "Available", timeout_s=60)
        assert list((root / "volumes" / volume_name).iterdir()) == []
    finally:
        lc.down(root)
    assert not root.exists()
