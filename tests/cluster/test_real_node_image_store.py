"""The real node's image store outlives clusters: a new build under the same tag must free the earlier build's space.

The CRI plugin keeps a `sha256:<config digest>` reference to each image a pod ran. Left alone, that reference held
every earlier worker build (about 9 GiB each) until a CI machine's disk filled and the next import failed. These
tests import two tiny builds under one tag into the real containerd. The CRI plugin pins the first itself, as it
does for every image it learns of (or, should it not, the test makes the same reference with `ctr images tag`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.real_node import has_real_node, real_node_cluster, skip_unless_a_real_node_can_run
from tests.support.cluster import Cluster
from tests.support.paths import ROOT

if str(ROOT / "hack") not in sys.path:
    sys.path.insert(0, str(ROOT / "hack"))
from image import containerd, layers, oci, spec

pytestmark = pytest.mark.integration

TAG = f"docker.io/k2-operator/store-test:{uuid.uuid4().hex[:6]}"
CREATED = "1970-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def socket(cluster: Cluster) -> Iterator[Path]:
    """The real node's containerd socket: the session cluster's, else that of a cluster started for this module."""
    if has_real_node(cluster):
        yield cluster.kubeconfig.parent / "node" / "containerd" / "containerd.sock"
        return
    skip_unless_a_real_node_can_run()
    with real_node_cluster() as (_, layout):
        yield layout.node / "containerd" / "containerd.sock"


def ctr(socket: Path, *args: str, check: bool = True) -> str:
    command = ["ctr", f"--address={socket}", f"--namespace={containerd.NAMESPACE}", *args]
    return subprocess.run(command, check=check, capture_output=True, text=True).stdout


def build(tmp: Path, content: str) -> tuple[Path, str, spec.Layer]:
    """A one-layer image holding `/build` = content: (archive, manifest digest, layer)."""
    root = tmp / f"root-{content}"
    root.mkdir()
    (root / "build").write_text(content)
    layer, _ = layers.pack(root, tmp / f"layer-{content}", f"test build {content}")
    archive = tmp / f"image-{content}.oci.tar"
    return archive, oci.write_archive(archive, [(layer, tmp / f"layer-{content}")], CREATED, TAG), layer


def config_ref(socket: Path, manifest: str) -> str:
    """What the CRI plugin names an image by: `sha256:` and the digest of its config."""
    blob = ctr(socket, "content", "get", manifest)
    return str(json.loads(blob)["config"]["digest"])


def test_stale_refs_are_those_whose_image_no_tag_names() -> None:
    listing = [
        ("docker.io/k2-operator/worker:dev", "sha256:new"),
        ("sha256:cfg-new", "sha256:new"),  # the running build's CRI reference stays
        ("sha256:cfg-old", "sha256:old"),  # an earlier build, held only by its CRI reference
        ("docker.io/k2-operator/worker@sha256:old", "sha256:old"),  # a digest pin is no tag either
        ("docker.io/k2-operator/pause:local", "sha256:pause"),
    ]
    assert containerd.stale_refs(listing) == ["sha256:cfg-old", "docker.io/k2-operator/worker@sha256:old"]
    assert containerd.stale_refs(listing[:2] + listing[4:]) == []


def test_a_new_build_frees_the_earlier_one_even_when_a_cri_reference_pinned_it(socket: Path, tmp_path: Path) -> None:
    first, first_manifest, first_layer = build(tmp_path, "one")
    second, second_manifest, second_layer = build(tmp_path, "two")
    tags_before = {line for line in ctr(socket, "images", "ls", "--quiet").split() if not line.startswith("sha256:")}
    try:
        containerd.import_image(first, socket, TAG)
        assert containerd.imported_digest(socket, TAG) == first_manifest
        pin = config_ref(socket, first_manifest)
        if pin not in ctr(socket, "images", "ls", "--quiet").split():
            ctr(socket, "images", "tag", TAG, pin)

        containerd.import_image(second, socket, TAG)

        assert containerd.imported_digest(socket, TAG) == second_manifest, "complete and unpacked"
        refs = set(ctr(socket, "images", "ls", "--quiet").split())
        assert pin not in refs
        assert tags_before | {TAG} <= refs, "the other images' tags stay"
        blobs = set(ctr(socket, "content", "ls", "--quiet").split())
        assert first_layer.digest not in blobs and first_manifest not in blobs, "the first build's blobs are collected"
        assert second_layer.digest in blobs
        snapshots = ctr(socket, "snapshots", "ls")  # a one-layer image's snapshot is named by its layer's diff ID
        assert first_layer.diff_id not in snapshots and second_layer.diff_id in snapshots
    finally:
        ctr(socket, "images", "rm", "--sync", TAG, check=False)
        containerd.remove_stale_images(socket)
