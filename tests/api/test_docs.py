"""docs/api.md: the generated field tables are current, every field is documented, the YAML examples are valid."""

from __future__ import annotations

import re

import pytest
import yaml

from k2_api import ExpertPlacement, K2Serving, K2Training, placement_problems
from k2_api.docs import update_api_doc
from k2_api.generate import MODELS, open_api_schema
from k2_api.schema import walk
from tests.support.paths import ROOT

API_MD = ROOT / "docs" / "api.md"


def test_generated_tables_are_up_to_date() -> None:
    text = API_MD.read_text()
    assert update_api_doc(text) == text, "docs/api.md is out of date: run `k2 crds generate --docs docs/api.md`"


def test_every_field_of_every_kind_is_in_the_doc() -> None:
    text = API_MD.read_text()
    for kind in MODELS:
        schema = open_api_schema(kind)
        for top in ("spec", "status"):
            for path, _ in walk(schema["properties"][top], top):
                if path != top and not path.endswith(("[]", "{}")):
                    assert f"| `{path}` |" in text, f"{kind}: {path} is not documented"


def test_update_replaces_only_generated_blocks() -> None:
    text = "intro\n<!-- BEGIN GENERATED: K2Serving -->\nstale\n<!-- END GENERATED: K2Serving -->\noutro\n"
    updated = update_api_doc(text)
    assert updated.startswith("intro\n") and updated.endswith("outro\n") and "stale" not in updated
    assert "| `spec.eplb.minImprovement` |" in updated
    with pytest.raises(ValueError, match="Nope"):
        update_api_doc("<!-- BEGIN GENERATED: Nope -->\n<!-- END GENERATED: Nope -->")


def test_yaml_examples_in_the_doc_are_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", API_MD.read_text(), re.DOTALL)
    kinds = {"K2Training": K2Training, "K2Serving": K2Serving, "ExpertPlacement": ExpertPlacement}
    seen = set()
    for block in blocks:
        document = yaml.safe_load(block)
        resource = kinds[document["kind"]].model_validate(document)
        seen.add(document["kind"])
        if isinstance(resource, ExpertPlacement):
            assert placement_problems(resource.spec) == []
    assert seen == set(kinds)
