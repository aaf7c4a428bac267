"""Import the image archive into a containerd's `k8s.io` namespace (where the kubelet's CRI looks), once.

    python hack/image import SOCKET [ARCHIVE]

Skipped when containerd already has the tag at the archive's manifest digest, so a warm `make image` costs nothing;
after a change to the project only the new layer is sent (the layers containerd holds are left out of the tar).

The store outlives clusters, so earlier builds are removed from it, before and after each import: the CRI plugin
keeps a `sha256:<config>` reference to each image it learns of, and that reference alone would hold an old build's
layers (about 3 GB packed and 6 GB unpacked for the dependency layer) for ever.
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


def images(socket: Path, *filters: str) -> list[tuple[str, str]]:
    """`(reference, manifest digest)` for each image containerd lists (`ctr images ls`: REF TYPE DIGEST ...)."""
    rows = [line.split() for line in _ctr(socket, "images", "ls", *filters).stdout.splitlines()[1:]]
    return [(fields[0], fields[2]) for fields in rows if len(fields) >= 3]


def imported_digest(socket: Path, tag: str) -> str | None:
    """The manifest digest containerd has under `tag`, or None; also None when its layers are not all there and
    unpacked (an import that failed half-way), so that the next import does it again."""
    for line in _ctr(socket, "images", "check", f"name=={tag}").stdout.splitlines()[1:]:
        fields = line.split()  # REF TYPE DIGEST STATUS (n/n) SIZE UNPACKED
        if fields and fields[0] == tag:
            return fields[2] if fields[3] == "complete" and fields[-1] == "true" else None
    return None


def stale_refs(listing: list[tuple[str, str]]) -> list[str]:
    """The references, of `(name, manifest digest)` rows, whose image no tag names: what earlier builds left behind.

    A tag is a name that is not a digest (`sha256:...`, the CRI plugin's image ID) and pins none (`repo@sha256:...`).
    """
    tagged = {digest for name, digest in listing if not name.startswith("sha256:") and "@" not in name}
    return [name for name, digest in listing if digest not in tagged]


def remove_stale_images(socket: Path) -> list[str]:
    """Removes the references no tag shares an image with; containerd then collects their layers and snapshots."""
    stale = stale_refs(images(socket))
    if stale:
        _ctr(socket, "images", "rm", "--sync", *stale)
    return stale


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
    _report_removed(remove_stale_images(socket))
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
        raise RuntimeError(f"after the import containerd has {tag} at {got}, not {want} complete and unpacked")
    print(f"imported {tag} ({want}) into containerd {socket}, namespace {NAMESPACE}; {len(reused)} layers reused")
    _report_removed(remove_stale_images(socket))


def _report_removed(refs: list[str]) -> None:
    if refs:
        print(f"removed {len(refs)} references to earlier builds: {', '.join(refs)}")


def _layer_digests(tar: tarfile.TarFile) -> list[str]:
    index = json.loads(_read(tar, "index.json"))
    manifest = json.loads(_read(tar, _BLOBS + index["manifests"][0]["digest"].removeprefix("sha256:")))
    return [layer["digest"] for layer in manifest["layers"]]


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None, name
    return member.read()


def _ctr(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["ctr", "--address", str(socket), "--namespace", NAMESPACE, *args]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    from .builder import default_archive

    archive = Path(argv[1]) if len(argv) > 1 else default_archive()
    import_image(archive, Path(argv[0]))
    return 0
