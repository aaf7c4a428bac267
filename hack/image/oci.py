"""Write an OCI image layout as one tar archive (what `ctr images import` and `docker load` read)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from .spec import Layer, canonical_json, digest_of, image_config, image_index, image_manifest


def documents(layers: list[Layer], created: str, tag: str) -> tuple[bytes, bytes, bytes]:
    """(config, manifest, index.json) of the image, as the bytes that are hashed."""
    config = canonical_json(image_config(layers, created))
    manifest = canonical_json(image_manifest(config, layers))
    index = canonical_json(image_index(manifest, tag))
    return config, manifest, index


def write_archive(path: Path, layers: list[tuple[Layer, Path]], created: str, tag: str) -> str:
    """Write the archive to `path` (via a temporary name); returns the manifest digest."""
    config, manifest, index = documents([layer for layer, _ in layers], created, tag)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", index)
        for data in (config, manifest):
            _add_bytes(tar, _blob_name(digest_of(data)), data)
        for layer, blob in layers:
            info = tar.gettarinfo(str(blob), arcname=_blob_name(layer.digest))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with blob.open("rb") as f:
                tar.addfile(info, f)
    partial.rename(path)
    return digest_of(manifest)


def _blob_name(digest: str) -> str:
    algorithm, hexdigest = digest.split(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
