"""The pydantic models: examples round-trip, Python-side validation matches the CRD's, helpers compute what they say."""

from __future__ import annotations

import pydantic
import pytest

from k2_api import ExpertPlacement, K2Serving, K2Training
from k2_api.common import Resource
from k2_api.placement import round_robin
from tests.api.manifests import INLINE_CONFIG, Invalid, edited, invalid_manifests, load_example, placement

KINDS: dict[str, type[Resource]] = {
    "K2Training": K2Training,
    "K2Serving": K2Serving,
    "ExpertPlacement": ExpertPlacement,
}


def _subset(small: object, big: object) -> bool:
    """Every key and value of small is in big (big may carry defaults)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_subset, small, big))
    return bool(small == big)


@pytest.mark.parametrize("kind", ["K2Training", "K2Serving"])
def test_example_round_trips(kind: str) -> None:
    manifest = load_example(kind)
    resource = KINDS[kind].model_validate(manifest)
    dumped = resource.to_dict()
    assert _subset(manifest, dumped), "to_dict() lost or changed a field of the example"
    assert list(dumped)[:3] == ["apiVersion", "kind", "metadata"]
    assert KINDS[kind].model_validate(dumped) == resource


def test_full_manifest_from_the_api_server_is_read() -> None:
    body = load_example("K2Training")
    body["metadata"] |= {"namespace": "ns", "uid": "u-1", "generation": 3, "managedFields": [{"manager": "kubectl"}]}
    body["status"] = {
        "observedGeneration": 3,
        "restarts": 1,
        "conditions": [{"type": "Running", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "progress": {"step": 7, "loss": 5.25, "tokensPerSecond": 1200.5, "maxAttentionLogit": 31.0},
    }
    training = K2Training.model_validate(body)
    assert training.metadata.generation == 3 and training.metadata.namespace == "ns"
    assert training.status is not None and training.status.progress is not None
    assert training.status.progress.step == 7 and training.status.restarts == 1
    assert training.status.conditions[0].status == "True"
    assert training.to_dict()["metadata"]["managedFields"] == [{"manager": "kubectl"}]


def test_snake_case_names_are_accepted_too() -> None:
    spec = K2Training.model_validate(load_example("K2Training")).spec
    again = type(spec)(model=spec.model, image="img", num_nodes=3, gpus_per_node=0)
    assert again.to_dict()["numNodes"] == 3 and again.world_size == 3


def test_kind_and_api_version_are_checked() -> None:
    with pytest.raises(pydantic.ValidationError, match="kind"):
        K2Training.model_validate(edited(load_example("K2Training"), kind="K2Serving"))
    with pytest.raises(pydantic.ValidationError, match=r"apiVersion|api_version"):
        K2Training.model_validate(edited(load_example("K2Training"), apiVersion="k2.ai/v1"))


@pytest.mark.parametrize(("nodes", "gpus", "procs", "world"), [(2, 1, 1, 2), (2, 8, None, 16), (3, 0, None, 3)])
def test_world_size(nodes: int, gpus: int, procs: int | None, world: int) -> None:
    manifest = edited(load_example("K2Training"), spec__numNodes=nodes, spec__gpusPerNode=gpus)
    manifest["spec"].pop("procsPerNode")
    if procs is not None:
        manifest["spec"]["procsPerNode"] = procs
    spec = K2Training.model_validate(manifest).spec
    assert spec.world_size == world and spec.data_parallel == world


def test_serving_slots_and_move_budget() -> None:
    spec = K2Serving.model_validate(load_example("K2Serving")).spec
    assert spec.slots_per_rank(8) == 5  # ceil(8 / 2) + 1
    assert spec.slots_per_rank(9) == 6
    assert spec.eplb.move_budget(10) == 3  # ceil(0.25 * 10)
    capped = spec.eplb.model_copy(update={"max_moves": 1})
    assert capped.move_budget(10) == 1


def test_inline_config_keeps_unknown_hf_fields() -> None:
    manifest = edited(load_example("K2Serving"), spec__model={"config": dict(INLINE_CONFIG)})
    config = K2Serving.model_validate(manifest).spec.model.config
    assert config is not None
    assert config.hf_dict() == INLINE_CONFIG


def test_round_robin_placement_is_a_valid_manifest() -> None:
    manifest = placement(num_layers=3, num_experts=8, ranks=2, slots_per_rank=5)
    xp = ExpertPlacement.model_validate(manifest)
    assert xp.spec.layers == round_robin(3, 8, 2, 5)
    assert xp.spec.table(2) == [[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]]


@pytest.mark.parametrize("case", invalid_manifests(), ids=lambda c: c.id)
def test_python_models_reject_what_the_api_server_rejects(case: Invalid) -> None:
    kind = KINDS[case.manifest["kind"]]
    with pytest.raises(pydantic.ValidationError) as error:
        kind.model_validate(case.manifest)
    # Errors are located by pydantic (loc, with aliases) or name the field in the message (cross-field rules).
    located = {".".join(str(p) for p in e["loc"]) for e in error.value.errors()}
    leaf = case.field.split(".")[-1].split("[")[0]
    assert case.field in str(error.value) or any(leaf in loc for loc in located), str(error.value)
