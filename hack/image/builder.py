"""Build the worker image without Docker or a registry (what `make image` runs; needs root).

    python hack/image build [--import SOCKET] [--out PATH] [--cache DIR]

Three layers, each cached under `~/.cache/k2-image/layers/KEY` where KEY hashes the layer's inputs and its parent:

1. base: Debian 12 from `debootstrap --variant=minbase` plus hack/image/packages.txt, and the non-root user;
2. deps: a venv at /opt/k2/venv with the project's dependencies and its `workers` extra (torch), from the pip cache;
3. project: the project's wheel, installed without dependencies.

The OCI archive goes to `~/.cache/k2-image/worker-dev.oci.tar`; with `--import SOCKET` it is imported into that
containerd's `k8s.io` namespace as `docker.io/k2-operator/worker:dev`. Nothing changed: every layer and the archive
are cache hits, and the import is skipped when containerd already has the same manifest. The cache keeps only the
layers of the latest build (a dependency layer is about 9 GB on disk: its files and its blob).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import chroot, containerd, oci
from .layers import LayerCache, file_sha256, remove_tree
from .requirements import requirements
from .spec import (
    BASE_SETUP,
    BUILD_DIR,
    DEPS_INPUTS,
    DEPS_INSTALL,
    EXTRAS,
    PACKAGES_FILE,
    PROJECT_PATHS,
    PROJECT_PIP,
    ROOT,
    SUITE,
    TAG,
    VARIANT,
    Layer,
    layer_key,
    read_packages,
    tree_digest,
)

CREATED = "1970-01-01T00:00:00Z"
"""A fixed creation time: the same layers give the same manifest digest, so a warm build re-imports nothing."""
HOST_TOOLS = {"debootstrap": "debootstrap", "zstd": "zstd", "unshare": "util-linux"}
_SKIPPED = ("__pycache__", ".egg-info", ".pyc", ".mypy_cache", ".pytest_cache")

PROG = "hack/image build"


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "k2-image"


def default_archive(cache_dir: Path | None = None, tag: str = TAG) -> Path:
    """Where the latest archive of `tag` is linked: CACHE/worker-dev.oci.tar for the default tag."""
    return (cache_dir or default_cache()) / f"{tag.rsplit('/', 1)[1].replace(':', '-')}.oci.tar"


def pip_cache() -> Path:
    found = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    text = found.stdout.strip()
    return Path(text) if found.returncode == 0 and text else Path.home() / ".cache" / "pip"


def ensure_host_tools() -> None:
    """apt-get install the build's host tools that are missing (only those)."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


# --- the three layers ---


def make_base(rootfs: Path, scratch: Path, packages: list[str], mirror: str | None) -> None:
    """debootstrap minbase with `packages`, then the non-root user; no apt lists, .debs, device nodes or host names."""
    command = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(packages)}", SUITE, str(rootfs)]
    subprocess.run([*command, *([mirror] if mirror else [])], check=True, stdout=subprocess.DEVNULL)
    chroot.run(chroot.Stage(lowers=(), upper=rootfs, scratch=scratch, command=f"{BASE_SETUP} && apt-get clean"))
    for leftover in ("var/lib/apt/lists", "dev", "var/log", "var/cache/apt", "tmp", "run"):
        for child in (rootfs / leftover).iterdir():
            remove_tree(child)
    (rootfs / "etc" / "resolv.conf").write_text("")  # debootstrap copied the host's; the runtime mounts the pod's
    (rootfs / "etc" / "hostname").write_text("localhost\n")


def host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts (PIP_CERT, else the system bundle): pip in the image uses it too."""
    for candidate in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def make_deps(rootfs: Path, scratch: Path, base: Path) -> None:
    """The venv and the dependencies, with the host's pip cache (and CA bundle) mounted only for the build."""
    binds = {target: ROOT / source for target, source in DEPS_INPUTS.items()}
    env = {"PIP_CACHE_DIR": "/tmp/pip-cache", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **chroot.pip_env()}
    ca = host_ca_bundle()
    if ca is not None:
        binds[f"{BUILD_DIR}/ca.crt"] = ca
        env["PIP_CERT"] = f"{BUILD_DIR}/ca.crt"
    cache = pip_cache()
    cache.mkdir(parents=True, exist_ok=True)
    stage = chroot.Stage(
        lowers=(base,),
        upper=rootfs,
        scratch=scratch,
        command=DEPS_INSTALL,
        binds=binds,
        writable_binds={"/tmp/pip-cache": cache},
        env=env,
    )
    chroot.run(stage)


def project_files() -> Iterator[Path]:
    """The files the project's wheel is built from (PROJECT_PATHS, without caches and build leftovers)."""
    for name in PROJECT_PATHS:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.endswith(_SKIPPED))
            for f in sorted(filenames):
                if not f.endswith(_SKIPPED):
                    yield Path(dirpath) / f


def sources_digest(files: list[Path]) -> str:
    return tree_digest((p.relative_to(ROOT).as_posix(), p.stat().st_mode & 0o111, file_sha256(p)) for p in files)


def _offline_build_flags() -> list[str]:
    """Build the wheel with this interpreter's setuptools when it is new enough (no download), else isolated."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    minimum = next((int(m[1]) for r in requires if (m := re.fullmatch(r"setuptools>=(\d+)", r))), 0)
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation", "--no-index"] if major >= minimum else []


def make_project(rootfs: Path, scratch: Path, lowers: tuple[Path, ...], files: list[Path]) -> None:
    """Build the project's wheel on the host from a copy of its sources, and pip-install it into the venv."""
    source = scratch / "src"
    for path in files:
        target = source / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    wheels = scratch / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *_offline_build_flags()]
    subprocess.run([*pip_wheel, "--wheel-dir", str(wheels), str(source)], check=True)
    command = f"{PROJECT_PIP} {BUILD_DIR}/wheels/*.whl"
    chroot.run(
        chroot.Stage(
            lowers=lowers, upper=rootfs, scratch=scratch / "run", command=command, binds={f"{BUILD_DIR}/wheels": wheels}
        )
    )


# --- the build ---


@dataclass(frozen=True)
class Step:
    """One layer to build: its name, cache key, history line, and `make(rootfs, scratch)` that fills it."""

    name: str
    key: str
    created_by: str
    make: Callable[[Path, Path], None]


def plan(cache: LayerCache, mirror: str | None) -> list[Step]:
    """The three layers, bottom first, each keyed by its inputs and its parent's key."""
    packages = read_packages(PACKAGES_FILE.read_text())
    base_key = layer_key(
        None, {"suite": SUITE, "variant": VARIANT, "packages": packages, "setup": BASE_SETUP, "mirror": mirror}
    )
    reqs = requirements((ROOT / "pyproject.toml").read_text(), list(EXTRAS))
    # pyproject.toml reaches the layer only through `reqs`: editing its other tables rebuilds nothing.
    script = file_sha256(ROOT / DEPS_INPUTS[f"{BUILD_DIR}/requirements.py"])
    deps_key = layer_key(base_key, {"command": DEPS_INSTALL, "requirements": reqs, "script": script})
    files = list(project_files())
    project_key = layer_key(deps_key, {"command": PROJECT_PIP, "sources": sources_digest(files)})
    below_project = (cache.rootfs(deps_key), cache.rootfs(base_key))
    return [
        Step(
            "base",
            base_key,
            f"debootstrap --variant={VARIANT} {SUITE} + {' '.join(packages)}; {BASE_SETUP}",
            lambda r, s: make_base(r, s, packages, mirror),
        ),
        Step("deps", deps_key, DEPS_INSTALL, lambda r, s: make_deps(r, s, cache.rootfs(base_key))),
        Step(
            "project", project_key, f"{PROJECT_PIP} k2-operator", lambda r, s: make_project(r, s, below_project, files)
        ),
    ]


def build(cache: LayerCache, steps: list[Step]) -> list[tuple[Layer, Path]]:
    """Build the layers that are not cached; returns (layer, blob) per layer, bottom first."""
    out: list[tuple[Layer, Path]] = []
    for step in steps:
        start = time.monotonic()
        layer, built = cache.build(step.key, step.created_by, step.make)
        state = f"built in {time.monotonic() - start:.0f} s" if built else "cached"
        unpacked = cache.uncompressed_size(step.key)
        print(
            f"layer {step.name:<8} {step.key[:12]}  {state:<16}"
            f" {layer.size / 1e6:9.1f} MB compressed {unpacked / 1e6:9.1f} MB unpacked",
            flush=True,
        )
        out.append((layer, cache.blob(step.key)))
    return out


def cached_lowers(cache_dir: Path, mirror: str | None = None) -> list[Path]:
    """The built layers' directories, topmost first (an overlay's lowerdir order); LookupError when not built."""
    cache = LayerCache(cache_dir)
    steps = plan(cache, mirror)
    missing = [step.name for step in steps if cache.get(step.key) is None]
    if missing:
        raise LookupError(f"image layers {missing} are not built for this tree: run make image")
    return [cache.rootfs(step.key) for step in reversed(steps)]


def write_image(cache_dir: Path, layers: list[tuple[Layer, Path]], tag: str) -> Path:
    """The archive for these layers (a cache hit when they are unchanged), linked as worker-dev.oci.tar."""
    _, manifest, _ = oci.documents([layer for layer, _ in layers], CREATED, tag)
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    archive = images / f"{hashlib.sha256(manifest).hexdigest()}.oci.tar"
    if not archive.exists():
        oci.write_archive(archive, layers, CREATED, tag)
        for old in images.glob("*.oci.tar"):
            if old != archive:
                old.unlink()
    link = default_archive(cache_dir, tag)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        (Path(tmp) / "link").symlink_to(archive.relative_to(cache_dir))
        (Path(tmp) / "link").rename(link)
    return link


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache(), help="layer cache (default ~/.cache/k2-image)")
    parser.add_argument("--import", dest="socket", metavar="SOCKET", help="containerd socket to import the image into")
    parser.add_argument("--out", type=Path, help="also place the archive here (hard link when possible)")
    parser.add_argument("--mirror", help="Debian mirror for debootstrap (default: debootstrap's)")
    parser.add_argument("--tag", default=TAG)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the image build needs root (debootstrap, chroot and mount namespaces)", file=sys.stderr)
        return 1
    start = time.monotonic()
    ensure_host_tools()
    args.cache.mkdir(parents=True, exist_ok=True)
    cache = LayerCache(args.cache)
    with cache.locked(shared=False):
        cache.drop_partials()
        steps = plan(cache, args.mirror)
        layers = build(cache, steps)
        archive = write_image(args.cache, layers, args.tag)
        if pruned := cache.keep_only({step.key for step in steps}):
            print(f"removed {len(pruned)} layers of earlier builds from {cache.root}")
        unpacked = sum(cache.uncompressed_size(step.key) for step in steps)
    compressed = sum(layer.size for layer, _ in layers)
    print(f"image {args.tag}: {archive} ({compressed / 1e9:.2f} GB compressed, {unpacked / 1e9:.2f} GB unpacked)")
    if args.out:
        _place(archive.resolve(), args.out)
    if args.socket:
        containerd.import_image(archive, Path(args.socket), args.tag)
    else:
        print("not imported: no containerd socket given (make image CONTAINERD_SOCKET=PATH, or --import PATH)")
    print(f"done in {time.monotonic() - start:.1f} s")
    return 0


def _place(archive: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    try:
        out.hardlink_to(archive)
    except OSError:
        shutil.copyfile(archive, out)
