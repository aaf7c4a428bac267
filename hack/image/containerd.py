"""Import the image archive into a containerd's `k8s.io` namespace (where the kubelet's CRI looks), once.

    python hack/image import SOCKET [ARCHIVE]

Skipped when containerd already has the tag at the archive's manifest digest, so a warm `make image` costs nothing;
after a change to the project only the new layer is sent (the layers containerd holds are left out of the tar).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .spec import TAG

NAMESPACE = "k8s.io"
_BLOBS = "blobs/sha256/"


def archive_manifest_digest(archive: Path) -> str:
    """The manifest digest that index.json of the OCI archive names."""
    with tarfile.open(archive) as tar:
        index = json.loads(_read(tar, "index.json"))
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


def thin_copy(archive: Path, out: Path, present: set[str]) -> list[str]:
    """Copy the OCI archive to `out` without the layer blobs in `present`; returns the digests left out."""
    left_out: list[str] = []
    with tarfile.open(archive) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        layers = set(_layer_digests(src))
        for member in src:
            digest = "sha256:" + member.name.removeprefix(_BLOBS)
            if member.name.startswith(_BLOBS) and digest in layers and digest in present:
                left_out.append(digest)
                continue
            dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    return left_out


def import_image(archive: Path, socket: Path, tag: str = TAG) -> None:
    """Import the archive unless containerd has it; layer blobs containerd already holds are not sent again."""
    if not socket.is_socket():
        raise ValueError(f"--import: {socket} is not a socket (is containerd running?)")
    want = archive_manifest_digest(archive)
    if imported_digest(socket, tag) == want:
        print(f"containerd {socket} already has {tag} at {want}")
        return
    present = set(_ctr(socket, "content", "ls", "--quiet").stdout.split())
    with tempfile.TemporaryDirectory(dir=archive.resolve().parent) as tmp:
        thin = Path(tmp) / "import.oci.tar"
        reused = thin_copy(archive.resolve(), thin, present)
        _ctr(socket, "images", "import", str(thin))
    got = imported_digest(socket, tag)
    if got != want:
        raise RuntimeError(f"after the import containerd has {tag} at {got}, not {want}")
    print(f"imported {tag} ({want}) into containerd {socket}, namespace {NAMESPACE}; {len(reused)} layers reused")


def _layer_digests(tar: tarfile.TarFile) -> list[str]:
    index = json.loads(_read(tar, "index.json"))
    manifest = json.loads(_read(tar, _BLOBS + index["manifests"][0]["digest"].removeprefix("sha256:")))
    return [layer["digest"] for layer in manifest["layers"]]


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None, name
    return member.read()


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
