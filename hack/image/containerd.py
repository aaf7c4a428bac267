"""Import the image archive into a containerd's `k8s.io` namespace (where the kubelet's CRI looks), once.

    python hack/image import SOCKET [ARCHIVE]

Skipped when containerd already has the tag at the archive's manifest digest, so a warm `make image` costs nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from .spec import TAG

NAMESPACE = "k8s.io"


def archive_manifest_digest(archive: Path) -> str:
    """The manifest digest that index.json of the OCI archive names."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    digest: str = index["manifests"][0]["digest"]
    return digest


def imported_digest(socket: Path, tag: str) -> str | None:
    """The manifest digest containerd has under `tag`, or None."""
    listing = _ctr(socket, "images", "ls", f"name=={tag}").stdout.splitlines()
    for line in listing[1:]:
        fields = line.split()
        if fields and fields[0] == tag:
            return fields[2]
    return None


def import_image(archive: Path, socket: Path, tag: str = TAG) -> None:
    if not socket.is_socket():
        raise ValueError(f"--import: {socket} is not a socket (is containerd running?)")
    want = archive_manifest_digest(archive)
    if imported_digest(socket, tag) == want:
        print(f"containerd {socket} already has {tag} at {want}")
        return
    _ctr(socket, "images", "import", "--no-unpack=false", str(archive.resolve()))
    got = imported_digest(socket, tag)
    if got != want:
        raise RuntimeError(f"after the import containerd has {tag} at {got}, not {want}")
    print(f"imported {tag} ({want}) into containerd {socket}, namespace {NAMESPACE}")


def _ctr(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", "--address", str(socket), "--namespace", NAMESPACE, *args], check=True, capture_output=True, text=True
    )


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    from .builder import default_archive

    archive = Path(argv[1]) if len(argv) > 1 else default_archive()
    import_image(archive, Path(argv[0]))
    return 0
