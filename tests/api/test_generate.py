"""The generated CRD YAML: in sync with the models, structural, and carrying what kubectl and the operator rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from k2_api import crds_cli, generate
from k2_api.schema import walk
from tests.support.paths import ROOT

CRD_FILES = ("k2trainings.k2.ai.yaml", "k2servings.k2.ai.yaml", "expertplacements.k2.ai.yaml")
# Keys Kubernetes forbids in a CRD schema (besides $ref): kubernetes/website custom-resource-definitions.md.
FORBIDDEN = {
    "$ref",
    "$defs",
    "definitions",
    "title",
    "dependencies",
    "patternProperties",
    "readOnly",
    "writeOnly",
    "xml",
}


def _crds() -> dict[str, dict[str, Any]]:
    return {name: yaml.safe_load((ROOT / "crds" / name).read_text()) for name in CRD_FILES}


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_yaml_matches_the_models(tmp_path: Path) -> None:
    assert crds_cli.main(["--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CRD_FILES)
    for name in CRD_FILES:
        assert (tmp_path / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"crds/{name} is out of date: run `k2 crds generate`"
        )


def test_check_mode_reports_drift(tmp_path: Path) -> None:
    generate.write(tmp_path)
    assert crds_cli.main(["--out", str(tmp_path), "--check"]) == 0
    path = tmp_path / CRD_FILES[0]
    path.write_text(path.read_text().replace("Gang restarts", "Gang restart"))
    assert crds_cli.main(["--out", str(tmp_path), "--check"]) == 1
    assert "Gang restart " in path.read_text(), "--check must not write"


def test_output_is_deterministic() -> None:
    assert generate.generated_files() == generate.generated_files()


@pytest.mark.parametrize("name", CRD_FILES)
def test_schema_is_structural(name: str) -> None:
    for path, node in walk(_schema(_crds()[name])):
        assert not FORBIDDEN & set(node), f"{path}: forbidden keys {FORBIDDEN & set(node)}"
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("additionalProperties" in node and "properties" in node), path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(bound, True), bool), f"{path}: {bound} must be a boolean"
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path}: every node needs a type"
        if path.startswith("spec") and "properties" not in node and node.get("type") not in ("array", "object"):
            assert node.get("description") or path.endswith(("[]", "{}")), f"{path}: no description for kubectl explain"


def test_preserve_unknown_fields_only_where_free_form() -> None:
    free_form = {
        path
        for crd in _crds().values()
        for path, node in walk(_schema(crd))
        if node.get("x-kubernetes-preserve-unknown-fields")
    }
    assert free_form == {"spec.scheduling.affinity", "spec.model.config"}


def test_conditions_are_list_maps_keyed_by_type() -> None:
    for name, crd in _crds().items():
        conditions = _schema(crd)["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map", name
        assert conditions["x-kubernetes-list-map-keys"] == ["type"], name
        assert set(conditions["items"]["required"]) >= {"type", "status"}, name


def test_names_subresources_and_columns() -> None:
    crds = _crds()
    names = {crd["spec"]["names"]["kind"]: crd["spec"]["names"] for crd in crds.values()}
    assert {kind: n["shortNames"] for kind, n in names.items()} == {
        "K2Training": ["k2t"],
        "K2Serving": ["k2s"],
        "ExpertPlacement": ["xp"],
    }
    assert all(n["categories"] == ["k2"] for n in names.values())
    versions = {crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0] for crd in crds.values()}
    assert all(v["subresources"]["status"] == {} for v in versions.values())
    assert versions["K2Serving"]["subresources"]["scale"] == {
        "specReplicasPath": ".spec.groups",
        "statusReplicasPath": ".status.readyGroups",
        "labelSelectorPath": ".status.selector",
    }
    columns = {
        kind: [c["name"] for c in v["additionalPrinterColumns"] if "priority" not in c] for kind, v in versions.items()
    }
    assert columns == {
        "K2Training": ["Ready", "Step", "Steps", "Loss", "Tokens/s", "Restarts", "Age"],
        "K2Serving": ["Groups", "Ready", "Balance", "Generation", "Age"],
        "ExpertPlacement": ["Generation", "Applied", "Balance", "Age"],
    }


def test_every_column_path_exists_in_the_schema() -> None:
    for crd in _crds().values():
        paths = {path for path, _ in walk(_schema(crd))}
        for column in crd["spec"]["versions"][0]["additionalPrinterColumns"]:
            if column["jsonPath"] != ".metadata.creationTimestamp":
                assert column["jsonPath"].removeprefix(".") in paths, column


def test_cel_messages_name_a_field() -> None:
    for crd in _crds().values():
        for path, node in walk(_schema(crd)):
            for rule in node.get("x-kubernetes-validations", []):
                assert rule["message"].startswith(("spec.", "metadata.")), (path, rule)
