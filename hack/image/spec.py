"""What the worker image is: its layers' recipes, its OCI config and the archive's JSON documents. Pure.

`builder.py` runs these recipes in a debootstrap root filesystem; the repository's Dockerfile runs the same commands,
and tests/cluster/test_image.py checks that the two agree. Each layer is cached under the hash of its inputs (its
recipe and its parent's key), so changing the project rebuilds only the last, small layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

TAG = "docker.io/k2-operator/worker:dev"
"""The name containerd knows the image by; pods say `k2-operator/worker:dev` (the same, normalised)."""
SUITE = "bookworm"
VARIANT = "minbase"
DOCKER_BASE = f"debian:{SUITE}-slim"
"""The Dockerfile's base: Debian's own minimal image of the same suite."""

UID = 65532
USER = f"{UID}:{UID}"
VENV = "/opt/k2/venv"
WORKDIR = "/opt/k2"
EXTRAS = ("workers",)
PIP_VERSION = "26.3"
BUILD_DIR = "/tmp/k2-build"
"""Where each builder puts its build inputs (pyproject, requirements.py, the wheel) inside the image, never kept."""

ENTRYPOINT = [f"{VENV}/bin/k2"]
CMD = ["--help"]
ENV = {
    "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "VIRTUAL_ENV": VENV,
    # The root filesystem is read-only; pods mount an emptyDir at /tmp, so every cache and home lives there.
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}

PACKAGES_FILE = HERE / "packages.txt"
PROJECT_PATHS = ("pyproject.toml", "README.md", "crds", "operator", "workers", "eplb_controller")
"""What the project layer is built from (the Dockerfile bind-mounts the same, see .dockerignore)."""

# The layers' commands, run as root inside the image (the Dockerfile's RUN lines, word for word).
BASE_SETUP = (
    f"groupadd --gid {UID} k2"
    f" && useradd --uid {UID} --gid {UID} --home-dir /tmp --no-create-home --shell /usr/sbin/nologin k2"
    f" && mkdir -p {WORKDIR}"
)
DEPS_INSTALL = (
    f"python3 -m venv {VENV}"
    f" && {VENV}/bin/pip install --quiet pip=={PIP_VERSION}"
    f" && python3 {BUILD_DIR}/requirements.py {BUILD_DIR}/pyproject.toml {' '.join(EXTRAS)}"
    " > /tmp/requirements.txt"
    f" && {VENV}/bin/pip install --quiet -r /tmp/requirements.txt"
    " && rm /tmp/requirements.txt"
)
DEPS_INPUTS = {
    f"{BUILD_DIR}/requirements.py": "hack/image/requirements.py",
    f"{BUILD_DIR}/pyproject.toml": "pyproject.toml",
}
"""What DEPS_INSTALL reads: target inside the image -> path in the repository (bind-mounted read-only)."""
PROJECT_PIP = f"{VENV}/bin/pip install --quiet --no-cache-dir --no-deps"
"""The project goes in without its dependencies: they are the layer below."""


def read_packages(text: str) -> list[str]:
    """The package names of packages.txt: one a line, `#` starts a comment."""
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [n for n in names if n]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_key(parent: str | None, recipe: dict[str, Any]) -> str:
    """A layer's cache key: the hash of its recipe and of its parent's key (a changed base rebuilds all above)."""
    blob = json.dumps({"parent": parent, "recipe": recipe}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def tree_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """The hash of a file tree given as (relative path, mode, content sha256) entries, in any order."""
    lines = sorted(f"{path}\0{mode:o}\0{sha}" for path, mode, sha in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class Layer:
    """A built layer: its compressed blob's digest and size, the digest of its uncompressed tar, and why it exists."""

    digest: str
    size: int
    diff_id: str
    created_by: str

    MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size, "diff_id": self.diff_id, "created_by": self.created_by}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        return cls(data["digest"], data["size"], data["diff_id"], data["created_by"])


def image_config(layers: list[Layer], created: str) -> dict[str, Any]:
    """The OCI image config: non-root user, `k2` entrypoint, env for a read-only root, one diff_id per layer."""
    return {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "Env": [f"{k}={v}" for k, v in ENV.items()],
            "Entrypoint": ENTRYPOINT,
            "Cmd": CMD,
            "WorkingDir": WORKDIR,
            "Labels": {"org.opencontainers.image.title": "k2-operator worker"},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": layer.created_by} for layer in layers],
    }


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


def image_manifest(config: bytes, layers: list[Layer]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [{"mediaType": Layer.MEDIA_TYPE, "digest": layer.digest, "size": layer.size} for layer in layers],
    }


def image_index(manifest: bytes, tag: str) -> dict[str, Any]:
    """index.json of the OCI layout; containerd's importer names the image by `io.containerd.image.name`."""
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                **descriptor("application/vnd.oci.image.manifest.v1+json", manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": tag,
                    "org.opencontainers.image.ref.name": tag.rsplit(":", 1)[1],
                },
            }
        ],
    }


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
