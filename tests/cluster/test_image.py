"""The worker image: the Dockerfile agrees with the debootstrap builder (hack/image), whose pieces do what they say,
and the built image runs non-root on a read-only root filesystem (integration: builds it, or reuses the cache)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k2_operator.builders.common import NON_ROOT_UID, writable_tmp
from tests.support.prerequisites import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "hack") not in sys.path:
    sys.path.insert(0, str(ROOT / "hack"))

from image import builder, chroot, containerd, layers, oci, runc, spec  # noqa: E402
from image.requirements import requirements  # noqa: E402

# --- the Dockerfile, parsed ---


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of a Dockerfile: continuation lines joined, comments and the syntax line dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    return [(word.upper(), rest.strip()) for word, _, rest in (entry.partition(" ") for entry in logical)]


def _run_parts(rest: str) -> tuple[list[dict[str, str]], str]:
    """A RUN's --mount options (as dicts) and its shell command."""
    mounts: list[dict[str, str]] = []
    while match := re.match(r"--mount=(\S+)\s+", rest):
        mounts.append(dict(field.partition("=")[::2] for field in match[1].split(",")))
        rest = rest[match.end() :]
    return mounts, rest


DOCKERFILE = _instructions((ROOT / "Dockerfile").read_text())
RUNS = [_run_parts(rest) for word, rest in DOCKERFILE if word == "RUN"]


def _run_with(command_start: str) -> tuple[list[dict[str, str]], str]:
    found = [run for run in RUNS if run[1].startswith(command_start)]
    assert len(found) == 1, f"one RUN starting {command_start!r} in the Dockerfile, found {len(found)}"
    return found[0]


def _single(word: str) -> str:
    values = [rest for w, rest in DOCKERFILE if w == word]
    assert len(values) == 1, f"one {word} in the Dockerfile"
    return values[0]


def test_dockerfile_starts_from_the_builders_debian_suite() -> None:
    first_from = next(rest for word, rest in DOCKERFILE if word == "FROM")
    assert first_from.split()[0] == spec.DOCKER_BASE == f"debian:{spec.SUITE}-slim"


def test_dockerfile_installs_the_builders_package_list() -> None:
    mounts, command = _run_with("apt-get update")
    binds = {m["target"]: m["source"] for m in mounts if m.get("type") == "bind"}
    listed = [target for target, source in binds.items() if ROOT / source == spec.PACKAGES_FILE]
    assert listed, "the apt RUN bind-mounts hack/image/packages.txt"
    assert f"{listed[0]} | xargs apt-get install -y --no-install-recommends" in command
    assert "python3" in spec.read_packages(spec.PACKAGES_FILE.read_text())


def test_dockerfile_runs_the_builders_commands_word_for_word() -> None:
    commands = [command for _, command in RUNS]
    assert spec.BASE_SETUP in commands
    assert spec.DEPS_INSTALL in commands
    project_mounts, project_command = _run_with(spec.PROJECT_PIP)
    assert project_command == f"{spec.PROJECT_PIP} {project_mounts[0]['target']}"
    assert "--no-deps" in spec.PROJECT_PIP


def test_dockerfile_mounts_the_builders_dependency_inputs() -> None:
    mounts, _ = _run_with(spec.DEPS_INSTALL)
    binds = {m["target"]: m["source"] for m in mounts if m.get("type") == "bind"}
    assert binds == spec.DEPS_INPUTS
    assert any(m.get("type") == "cache" and m.get("target") == "/root/.cache/pip" for m in mounts)


def test_dockerfile_config_matches_the_builders_image_config() -> None:
    env = dict(pair.split("=", 1) for pair in shlex.split(_single("ENV")))
    assert env == spec.ENV
    assert _single("USER") == spec.USER
    assert _single("WORKDIR") == spec.WORKDIR
    assert json.loads(_single("ENTRYPOINT")) == spec.ENTRYPOINT
    assert json.loads(_single("CMD")) == spec.CMD


def test_dockerignore_sends_exactly_what_the_builder_reads() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    expected = {*spec.PROJECT_PATHS, *spec.DEPS_INPUTS.values(), spec.PACKAGES_FILE.relative_to(ROOT).as_posix()}
    assert allowed == expected
    assert "*" in lines


# --- the builder's pure parts ---


def test_requirements_are_the_dependencies_plus_the_workers_extra() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    got = requirements((ROOT / "pyproject.toml").read_text(), list(spec.EXTRAS))
    assert got == project["dependencies"] + project["optional-dependencies"]["workers"]
    assert any(r.startswith("torch") for r in got)
    assert not any(r.startswith("pytest") for r in got)


def test_requirements_expand_the_projects_own_extras_and_name_a_missing_one() -> None:
    pyproject = """
[project]
name = "Demo_Pkg"
dependencies = ["a>=1"]
[project.optional-dependencies]
core = ["b", "a>=1"]
all = ["demo-pkg[core]", "c"]
"""
    assert requirements(pyproject, ["all"]) == ["a>=1", "b", "c"]
    with pytest.raises(ValueError, match="extras: \\['gpu'\\]"):
        requirements(pyproject, ["gpu"])


def test_layer_keys_follow_recipe_and_parent() -> None:
    key = spec.layer_key("parent", {"command": "x"})
    assert key == spec.layer_key("parent", {"command": "x"})
    assert key != spec.layer_key("other", {"command": "x"})
    assert key != spec.layer_key("parent", {"command": "y"})


def test_tree_digest_ignores_order_but_not_content_or_mode() -> None:
    entries = [("a", 0, "1"), ("b/c", 0o111, "2")]
    digest = spec.tree_digest(entries)
    assert digest == spec.tree_digest(reversed(entries))
    assert digest != spec.tree_digest([("a", 0, "1"), ("b/c", 0, "2")])
    assert digest != spec.tree_digest([("a", 0, "9"), ("b/c", 0o111, "2")])


def test_project_layer_key_covers_every_package_and_skips_caches() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in builder.project_files()}
    for package in ("crds/k2_api/cli.py", "operator/k2_operator/builders/common.py", "pyproject.toml"):
        assert package in names
    assert any(n.startswith("workers/k2_workers/") for n in names)
    assert any(n.startswith("eplb_controller/k2_eplb/") for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_cache_keeps_only_the_latest_builds_layers(tmp_path: Path) -> None:
    cache = layers.LayerCache(tmp_path)
    for name in ("current", "old", "half.partial"):
        (cache.root / name / "rootfs").mkdir(parents=True)
    cache.drop_partials()
    assert sorted(p.name for p in cache.root.iterdir()) == ["current", "old"]
    assert cache.keep_only({"current"}) == ["old"]
    assert [p.name for p in cache.root.iterdir()] == ["current"]


def _layer(n: int) -> spec.Layer:
    return spec.Layer(f"sha256:{n:064x}", 100 + n, f"sha256:{n + 10:064x}", f"step {n}")


def test_image_config_is_non_root_with_caches_on_the_pods_tmp_mount() -> None:
    config = spec.image_config([_layer(1), _layer(2)], "1970-01-01T00:00:00Z")
    uid = int(config["config"]["User"].split(":")[0])
    assert uid != 0
    assert config["config"]["Entrypoint"] == [f"{spec.VENV}/bin/k2"]
    assert config["rootfs"]["diff_ids"] == [_layer(1).diff_id, _layer(2).diff_id]
    tmp = writable_tmp()[1]["mountPath"]
    env = dict(entry.split("=", 1) for entry in config["config"]["Env"])
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME"):
        assert env[key].startswith(tmp), key
    assert env["PATH"].startswith(f"{spec.VENV}/bin:")


def test_archive_documents_reference_each_other_by_digest() -> None:
    config, manifest, index = oci.documents([_layer(1), _layer(2)], "1970-01-01T00:00:00Z", spec.TAG)
    index_doc, manifest_doc = json.loads(index), json.loads(manifest)
    assert index_doc["manifests"][0]["digest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert index_doc["manifests"][0]["annotations"]["io.containerd.image.name"] == spec.TAG
    assert manifest_doc["config"]["digest"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert [d["digest"] for d in manifest_doc["layers"]] == [_layer(1).digest, _layer(2).digest]
    again = oci.documents([_layer(1), _layer(2)], "1970-01-01T00:00:00Z", spec.TAG)
    assert again == (config, manifest, index), "the same layers give the same manifest (a warm build imports nothing)"


def test_import_leaves_out_only_the_layer_blobs_containerd_holds(tmp_path: Path) -> None:
    blobs = []
    for n, data in enumerate((b"base layer", b"project layer")):
        blob = tmp_path / f"layer{n}"
        blob.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs.append((spec.Layer(digest, len(data), digest, f"step {n}"), blob))
    archive = tmp_path / "image.oci.tar"
    manifest_digest = oci.write_archive(archive, blobs, "1970-01-01T00:00:00Z", spec.TAG)
    present = {blobs[0][0].digest, manifest_digest, "sha256:" + "0" * 64}

    left_out = containerd.thin_copy(archive, tmp_path / "thin.oci.tar", present)

    assert left_out == [blobs[0][0].digest]
    with tarfile.open(tmp_path / "thin.oci.tar") as thin:
        names = set(thin.getnames())
    assert f"blobs/sha256/{blobs[1][0].digest.split(':')[1]}" in names
    assert f"blobs/sha256/{blobs[0][0].digest.split(':')[1]}" not in names
    assert {"index.json", "oci-layout", f"blobs/sha256/{manifest_digest.split(':')[1]}"} <= names
    assert containerd.archive_manifest_digest(tmp_path / "thin.oci.tar") == manifest_digest


def test_build_mounts_only_under_tmp_and_stack_lowers_topmost_first(tmp_path: Path) -> None:
    stage = chroot.Stage(
        lowers=(tmp_path / "top", tmp_path / "base"), upper=tmp_path / "u", scratch=tmp_path / "s", command="true"
    )
    script = chroot.mount_script(stage)
    assert f"lowerdir={tmp_path / 'top'}:{tmp_path / 'base'},upperdir={tmp_path / 'u'}" in script
    assert script.rstrip().endswith("/bin/sh -euc true")
    outside = chroot.Stage(lowers=(), upper=tmp_path, scratch=tmp_path, command="true", binds={"/opt/x": tmp_path})
    with pytest.raises(ValueError, match="binds: /opt/x"):
        chroot.mount_script(outside)


def test_runtime_spec_is_restricted_with_a_read_only_root() -> None:
    runtime = runc.runtime_spec(["k2", "--help"], 1000, spec.ENV, spec.WORKDIR)
    assert runtime["root"]["readonly"] is True
    assert runtime["process"]["user"] == {"uid": 1000, "gid": 1000}
    assert runtime["process"]["noNewPrivileges"] is True
    assert all(caps == [] for caps in runtime["process"]["capabilities"].values())
    tmp = writable_tmp()[1]["mountPath"]
    assert any(m["destination"] == tmp and m["type"] == "tmpfs" for m in runtime["mounts"])


def _tar_members(blob: Path) -> tuple[dict[str, tarfile.TarInfo], bytes]:
    raw = subprocess.run(["zstd", "-d", "-c", str(blob)], check=True, capture_output=True).stdout
    import io

    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {m.name: m for m in tar.getmembers()}, raw


def test_pack_writes_numeric_owners_links_and_overlay_whiteouts(tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        skip_or_fail("zstd is not installed (hack/install-system-packages.sh installs it)")
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_text("#!/bin/sh\n")
    (tree / "bin" / "tool").chmod(0o755)
    os.link(tree / "bin" / "tool", tree / "bin" / "same")
    (tree / "bin" / "alias").symlink_to("tool")
    is_root = os.geteuid() == 0
    if is_root:
        os.mknod(tree / "bin" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # overlayfs whiteout
        (tree / "opaque").mkdir()
        os.setxattr(tree / "opaque", "trusted.overlay.opaque", b"y")
        os.chown(tree / "bin" / "tool", 1234, 1234)

    layer, size = layers.pack(tree, tmp_path / "layer.tar.zst", "test")

    members, raw = _tar_members(tmp_path / "layer.tar.zst")
    assert layer.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest() and size == len(raw)
    assert layer.digest == "sha256:" + hashlib.sha256((tmp_path / "layer.tar.zst").read_bytes()).hexdigest()
    assert members["bin/tool"].mode & 0o777 == 0o755
    assert members["bin/alias"].issym() and members["bin/alias"].linkname == "tool"
    assert {members["bin/same"].islnk(), members["bin/tool"].islnk()} == {True, False}
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    if is_root:
        assert members["bin/tool"].uid == 1234
        assert "bin/.wh.gone" in members and "bin/gone" not in members
        assert "opaque/.wh..wh..opq" in members


# --- the built image (expensive: the first build downloads torch; later runs reuse ~/.cache/k2-image) ---


def _needs_root_and_runc() -> None:
    """Skip without root or runc; in CI (which installs runc) fail instead, so the image is never silently untested."""
    missing = [need for need, ok in (("root", os.geteuid() == 0), ("runc", shutil.which("runc"))) if not ok]
    if missing:
        message = f"building and running the image needs {' and '.join(missing)} (hack/install-system-packages.sh)"
        skip_or_fail(message)


@pytest.fixture(scope="module")
def built_image() -> Iterator[list[Path]]:
    """The image's layer directories (topmost first), built now or found in the cache, kept while the tests run."""
    _needs_root_and_runc()
    subprocess.run([sys.executable, str(ROOT / "hack" / "image"), "build"], check=True, cwd=ROOT, timeout=3600)
    cache = builder.default_cache()
    with layers.LayerCache(cache).locked(shared=True):  # a concurrent build waits instead of pruning these
        lowers: list[Path] = builder.cached_lowers(cache)
        yield lowers


def _run(lowers: list[Path], uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = runc.run(lowers, list(args), uid=uid)
    return done


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_image_runs_k2_and_torch_as_non_root_on_a_read_only_root(built_image: list[Path]) -> None:
    helped = _run(built_image, spec.UID, "k2", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "k2 worker train" in helped.stdout and "k2 operator run" in helped.stdout

    probe = "import os, torch, k2_workers.model; open('/tmp/ok', 'w').write('x'); print(os.getuid(), torch.__version__)"
    for uid in (spec.UID, NON_ROOT_UID):  # the image's user, and the one the operator's pods run as
        imported = _run(built_image, uid, "python", "-c", probe)
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout.split()[0] == str(uid)

    # The operator and the EPLB controller run from the same image without loading torch.
    controllers = "import sys, k2_operator.main, k2_eplb.controller; print('torch' in sys.modules)"
    light = _run(built_image, spec.UID, "python", "-c", controllers)
    assert (light.returncode, light.stdout.strip()) == (0, "False"), light.stderr

    written = _run(built_image, spec.UID, "python", "-c", "open('/opt/k2/x', 'w')")
    assert written.returncode != 0
    assert "Read-only file system" in written.stderr


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_archive_is_an_oci_layout_whose_digests_hold(built_image: list[Path]) -> None:
    archive = builder.default_archive()
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert member is not None
            return member.read()

        index = json.loads(_read(tar, "index.json"))
        descriptor = index["manifests"][0]
        assert descriptor["annotations"]["io.containerd.image.name"] == spec.TAG
        manifest_bytes = blob(descriptor["digest"])
        assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == descriptor["digest"]
        manifest: dict[str, Any] = json.loads(manifest_bytes)
        config = json.loads(blob(manifest["config"]["digest"]))
        assert config["config"]["User"] == spec.USER
        assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"]) == len(built_image) == 3
        top = manifest["layers"][-1]
        assert "sha256:" + hashlib.sha256(blob(top["digest"])).hexdigest() == top["digest"]
        sizes = {m.name: m.size for m in tar.getmembers()}
        for layer in manifest["layers"]:
            assert sizes[f"blobs/sha256/{layer['digest'].split(':')[1]}"] == layer["size"]


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None
    return member.read()
