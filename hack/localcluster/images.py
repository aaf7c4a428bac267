"""The pause image: a static binary built here, packed as a one-layer docker-archive that `ctr images import` reads.

registry.k8s.io is out of reach, and no registry is ever contacted: every image the real node runs is imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from .errors import ClusterError

PAUSE_SOURCE = Path(__file__).resolve().parent / "pause.c"
PAUSE_IMAGE = "docker.io/k2-operator/pause:local"
# A shell and network tools for the real node's tests (nslookup, wget, nc): the host's static busybox.
TOOLBOX_IMAGE = "docker.io/k2-operator/toolbox:local"
BUSYBOX = Path("/bin/busybox")  # Debian package busybox-static
TOOLBOX_APPLETS = (
    "sh",
    "cat",
    "echo",
    "ls",
    "mkdir",
    "sleep",
    "nslookup",
    "wget",
    "nc",
    "httpd",
    "ip",
    "id",
    "kill",
    "ps",
)


def _tar(files: dict[str, tuple[bytes, int]], links: dict[str, str] | None = None) -> bytes:
    """A deterministic tar of `files` (path -> (content, mode); a path ending in / is a directory) and symlinks
    (path -> target), owned by root, mtime 0."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.size, info.mode, info.mtime = len(content), mode, 0
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            tar.addfile(info, io.BytesIO(content))
        for name, target in sorted((links or {}).items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, 0
            tar.addfile(info)
    return out.getvalue()


def docker_archive(
    tag: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str], links: dict[str, str] | None = None
) -> bytes:
    """A docker-archive image tar: one layer holding `files` and `links`, a config naming `entrypoint`, and `tag`."""
    layer = _tar(files, links)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "hack/localcluster/images.py", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    config_json = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_json).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [layer_name]}]
    return _tar({
        "manifest.json": (json.dumps(manifest).encode(), 0o644),
        config_name: (config_json, 0o644),
        layer_name: (layer, 0o644),
    })  # fmt: skip


def build_pause(out_dir: Path) -> Path:
    """Compiles pause.c statically and writes the pause image archive; returns the archive's path."""
    if shutil.which("gcc") is None:
        raise ClusterError("gcc is missing (Debian packages gcc and libc6-dev): it builds the pause image")
    binary = out_dir / "pause"
    result = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ClusterError(f"building the pause binary failed:\n{result.stderr}")
    archive = out_dir / "pause-image.tar"
    archive.write_bytes(docker_archive(PAUSE_IMAGE, {"pause": (binary.read_bytes(), 0o755)}, ["/pause"]))
    return archive


def build_toolbox(out_dir: Path) -> Path | None:
    """The toolbox image archive (busybox and links to its applets), or None without a static busybox here."""
    if not BUSYBOX.is_file():
        return None
    links = {f"bin/{applet}": "busybox" for applet in TOOLBOX_APPLETS}
    files = {"bin/busybox": (BUSYBOX.read_bytes(), 0o755), "tmp/": (b"", 0o1777)}
    archive = out_dir / "toolbox-image.tar"
    archive.write_bytes(docker_archive(TOOLBOX_IMAGE, files, ["/bin/sh"], links))
    return archive
