"""Layers as files: pack a directory into a zstd-compressed layer tar, and cache built layers by key.

A cached layer is a directory `layers/KEY/` holding `rootfs/` (the layer's own files, usable as an overlay lower
directory for the layers above), `layer.tar.zst` (the blob) and `layer.json` (its digests). A layer being built lives
in `layers/KEY.partial/` and is renamed into place only when complete, so an interrupted build leaves no half layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .spec import Layer

_OPAQUE_XATTR = "trusted.overlay.opaque"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_COPY_BUFFER = 1 << 20


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._out.write(data)


def _entries(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, name in the tar) of everything under `root`, parents before children, names sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            yield path, path.relative_to(root).as_posix()


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, _OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _tar_tree(root: Path, out: IO[bytes]) -> None:
    """Write `root` as a layer tar: numeric owners, overlayfs whiteouts as OCI `.wh.` files."""
    with tarfile.open(fileobj=out, mode="w|", bufsize=_COPY_BUFFER, format=tarfile.PAX_FORMAT) as tar:
        for path, name in _entries(root):
            st = path.lstat()
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # an overlayfs whiteout: the name was deleted
                parent, _, base = name.rpartition("/")
                info = tarfile.TarInfo(f"{parent}/{_WHITEOUT}{base}" if parent else f"{_WHITEOUT}{base}")
                tar.addfile(info)
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            info = tar.gettarinfo(str(path), arcname=name)
            info.uname = info.gname = ""
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if info.isdir() and _is_opaque(path):
                tar.addfile(tarfile.TarInfo(f"{name}/{_OPAQUE}"))


def pack(root: Path, blob: Path, created_by: str) -> tuple[Layer, int]:
    """Pack `root` into the zstd blob `blob`; returns the layer and its uncompressed size."""
    with blob.open("wb") as sink:
        zstd = subprocess.Popen(["zstd", "-q", "-T0", "-3", "-c"], stdin=subprocess.PIPE, stdout=sink)
        assert zstd.stdin is not None
        writer = _HashingWriter(zstd.stdin)
        try:
            _tar_tree(root, writer)  # type: ignore[arg-type]  # a write-only file is all tarfile's stream needs
        finally:
            zstd.stdin.close()
        if zstd.wait() != 0:
            raise RuntimeError(f"zstd failed packing {root}")
    layer = Layer(
        digest="sha256:" + file_sha256(blob),
        size=blob.stat().st_size,
        diff_id="sha256:" + writer.sha.hexdigest(),
        created_by=created_by,
    )
    return layer, writer.size


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_BUFFER):
            sha.update(chunk)
    return sha.hexdigest()


class LayerCache:
    """Built layers under `root/layers/`, keyed by `spec.layer_key`."""

    def __init__(self, root: Path) -> None:
        self.root = root / "layers"

    @contextlib.contextmanager
    def locked(self, shared: bool) -> Iterator[None]:
        """Builds hold the cache exclusively (a second build waits); readers of built layers hold it shared."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root.parent / "lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield

    def rootfs(self, key: str) -> Path:
        return self.root / key / "rootfs"

    def blob(self, key: str) -> Path:
        return self.root / key / "layer.tar.zst"

    def get(self, key: str) -> Layer | None:
        meta = self.root / key / "layer.json"
        if not meta.exists():
            return None
        return Layer.from_json(json.loads(meta.read_text()))

    def drop_partials(self) -> None:
        """Remove layers left half-built by an interrupted build (call with the cache's lock held)."""
        if self.root.exists():
            for partial in self.root.glob("*.partial"):
                remove_tree(partial)

    def keep_only(self, keys: set[str]) -> list[str]:
        """Remove every built layer but `keys` (call with the cache's lock held); returns the removed keys."""
        removed = sorted(d.name for d in self.root.iterdir() if d.is_dir() and d.name not in keys)
        for key in removed:
            remove_tree(self.root / key)
        return removed

    def uncompressed_size(self, key: str) -> int:
        size: int = json.loads((self.root / key / "layer.json").read_text())["uncompressed_size"]
        return size

    def build(self, key: str, created_by: str, make: Callable[[Path, Path], None]) -> tuple[Layer, bool]:
        """The cached layer `key`, or build it: `make(rootfs, scratch)` fills `rootfs` with the layer's own files.

        Returns the layer and whether it was built now.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, False
        partial = self.root / f"{key}.partial"
        if partial.exists():
            remove_tree(partial)
        (partial / "rootfs").mkdir(parents=True)
        (partial / "scratch").mkdir()
        make(partial / "rootfs", partial / "scratch")
        remove_tree(partial / "scratch")
        layer, uncompressed = pack(partial / "rootfs", partial / "layer.tar.zst", created_by)
        meta = {**layer.to_json(), "uncompressed_size": uncompressed}
        (partial / "layer.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(self.root / key)
        return layer, True


def remove_tree(path: Path) -> None:
    """rm -rf, also of trees holding read-only directories or overlayfs work dirs."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)
