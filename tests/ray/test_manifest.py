"""`k2 run` rejects a manifest the way admission does, naming the field, before any Ray starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from k2_api.contract import ExitCodes
from k2_workers.ray_run import manifest

from .run import K2_RUN
from .run import manifest as debug_manifest


def test_an_invalid_field_is_named_and_nothing_runs(tmp_path: Path) -> None:
    path = debug_manifest(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["spec"]["numNodes"] = 0
    path.write_text(yaml.safe_dump(document))
    result = subprocess.run([*K2_RUN, "-f", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == ExitCodes.INVALID_CONFIG
    assert "spec.numNodes: Input should be greater than or equal to 1" in result.stderr
    assert "Ray" not in result.stderr  # rejected before a Ray instance started


def test_cross_field_rules_and_unknown_fields_name_their_path(tmp_path: Path) -> None:
    document = yaml.safe_load(debug_manifest(tmp_path).read_text())
    document["spec"]["optimizer"]["warmupSteps"] = 100
    with pytest.raises(ValueError, match=r"spec.optimizer.warmupSteps \+ spec.optimizer.decaySteps must be <= "):
        manifest.validate(document)
    document = yaml.safe_load(debug_manifest(tmp_path).read_text())
    document["spec"]["numNode"] = 2
    with pytest.raises(ValueError, match=r"^spec.numNode: Extra inputs are not permitted$"):
        manifest.validate(document)


def test_a_file_without_a_known_kind_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="no K2Training or K2Serving document"):
        manifest.load(path)
