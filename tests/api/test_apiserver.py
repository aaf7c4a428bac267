"""The CRDs on the real local control plane: accepted, examples apply, invalid manifests rejected naming the field."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_api import ExpertPlacement, K2Serving, K2Training
from k2_api.placement import round_robin
from tests.api.manifests import EXAMPLES, Invalid, invalid_manifests, load_example, placement
from tests.support.cluster import Cluster
from tests.support.waits import wait_for

pytestmark = pytest.mark.integration


def _dry_run(cluster: Cluster, manifest: dict[str, Any], namespace: str = "default") -> Any:
    """Server-side apply with server dry run: the API server validates and defaults, stores nothing."""
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
        check=False,
    )


def _without_empty(value: Any) -> Any:
    """Empty maps and lists dropped (the API server stores no defaults for them)."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v not in ({}, [])}
    return value


def test_crds_are_served_with_short_names(cluster: Cluster, k2_crds: list[str]) -> None:
    assert sorted(k2_crds) == ["expertplacements.k2.ai", "k2servings.k2.ai", "k2trainings.k2.ai"]
    rows = cluster.kubectl("api-resources", "--api-group=k2.ai", "--no-headers").stdout.splitlines()
    short = {row.split()[0]: row.split()[1] for row in rows}
    assert short == {"expertplacements": "xp", "k2servings": "k2s", "k2trainings": "k2t"}
    assert cluster.kubectl("get", "k2", "-A").returncode == 0  # the category


def _explain(cluster: Cluster, field: str) -> str:
    """`kubectl explain`, retried: the apiserver publishes a new CRD's OpenAPI schema a moment after it is
    Established, and until then explain answers 'couldn't find resource'."""

    def explained() -> str | None:
        result = cluster.kubectl("explain", field, check=False)
        return " ".join(result.stdout.split()) if result.returncode == 0 else None

    return wait_for(f"kubectl explain {field}", explained)


def test_explain_shows_the_model_descriptions(cluster: Cluster, k2_crds: list[str]) -> None:
    assert "Gang restarts allowed before the training is marked Failed" in _explain(
        cluster, "k2t.spec.failurePolicy.maxRestarts"
    )
    assert "spec.ranks rows of spec.slotsPerRank ids" in _explain(cluster, "xp.spec.layers.slots")


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_examples_apply_and_get_defaults(cluster: Cluster, k2_crds: list[str], kind: str) -> None:
    result = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-n", "default", "-o", "json", f"--filename={EXAMPLES[kind]}"
    )
    body = json.loads(result.stdout)
    model = {"K2Training": K2Training, "K2Serving": K2Serving}[kind]
    resource = model.model_validate(body)
    assert resource.metadata.name == load_example(kind)["metadata"]["name"]
    # Server-side defaults come from the same models.
    expected_defaults = _without_empty(model.model_validate(load_example(kind)).spec.to_dict())
    assert body["spec"] == expected_defaults


@pytest.mark.parametrize("case", invalid_manifests(), ids=lambda c: c.id)
def test_invalid_manifest_is_rejected_naming_the_field(cluster: Cluster, k2_crds: list[str], case: Invalid) -> None:
    result = _dry_run(cluster, case.manifest)
    assert result.returncode != 0, f"accepted: {result.stdout[:300]}"
    assert case.field in result.stderr, result.stderr


def test_scale_status_and_printer_columns(cluster: Cluster, namespace: str, k2_crds: list[str]) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, f"--filename={EXAMPLES['K2Serving']}")
    name = load_example("K2Serving")["metadata"]["name"]
    cluster.kubectl("scale", "-n", namespace, f"k2s/{name}", "--replicas=3")
    assert cluster.kubectl("get", "-n", namespace, f"k2s/{name}", "-o", "jsonpath={.spec.groups}").stdout == "3"
    status = {
        "readyGroups": 2,
        "selector": "app.kubernetes.io/instance=x",
        "balancedness": 0.875,
        "placementGeneration": 4,
    }
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        f"k2s/{name}",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    scale = json.loads(
        cluster.kubectl("get", "-n", namespace, f"k2s/{name}", "--subresource=scale", "-o", "json").stdout
    )
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == "app.kubernetes.io/instance=x"
    table = cluster.kubectl("get", "-n", namespace, f"k2s/{name}").stdout.splitlines()
    assert table[0].split() == ["NAME", "GROUPS", "READY", "BALANCE", "GENERATION", "AGE"]
    assert table[1].split()[:5] == [name, "3", "2", "0.875", "4"]
    # A spec edit through the status subresource is ignored, and vice versa.
    cluster.kubectl(
        "patch", "-n", namespace, f"k2s/{name}", "--subresource=status", "--type=merge", "-p", '{"spec": {"groups": 7}}'
    )
    assert cluster.kubectl("get", "-n", namespace, f"k2s/{name}", "-o", "jsonpath={.spec.groups}").stdout == "3"


def test_kimi_k2_sized_placement_is_accepted(cluster: Cluster, namespace: str, k2_crds: list[str]) -> None:
    """60 MoE layers x 384 experts on 32 ranks of 13 slots: the CEL rules run within the cost budget at this size."""
    manifest = placement(num_layers=60, num_experts=384, ranks=32, slots_per_rank=13)
    manifest["spec"]["layers"] = [layer.to_dict() for layer in round_robin(60, 384, 32, 13)]
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    stored = json.loads(cluster.kubectl("get", "-n", namespace, "xp/xp-test", "-o", "json").stdout)
    xp = ExpertPlacement.model_validate(stored)
    assert len(xp.spec.layers) == 60 and xp.spec.table(59)[31] == round_robin(1, 384, 32, 13)[0].slots[31]
    # One out-of-range id in the last layer is still caught at this size.
    manifest["spec"]["layers"][59]["slots"][31][12] = 384
    result = _dry_run(cluster, manifest, namespace)
    assert result.returncode != 0 and "every expert id must be in [0, spec.numExperts)" in result.stderr


@st.composite
def _perturbed_placements(draw: st.DrawFn) -> dict[str, Any]:
    """Placement manifests near the validity boundary: each of shape, id range and layer count is sometimes off."""
    num_layers, ranks, slots = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, ranks * slots + 1))  # + 1: sometimes too few slots
    bad_shape, bad_ids, bad_layers = (draw(st.integers(0, 3)) == 0 for _ in range(3))
    ids = st.integers(0, num_experts if bad_ids else num_experts - 1)  # numExperts itself is out of range
    row_sizes = st.integers(max(1, slots - 1), slots + 1) if bad_shape else st.just(slots)
    num_rows = st.integers(max(1, ranks - 1), ranks + 1) if bad_shape else st.just(ranks)

    def table() -> list[list[int]]:
        return [draw(st.lists(ids, min_size=(n := draw(row_sizes)), max_size=n)) for _ in range(draw(num_rows))]

    layer_count = draw(st.integers(max(1, num_layers - 1), num_layers + 1)) if bad_layers else num_layers
    manifest = placement(num_layers=1, num_experts=1, ranks=1, slots_per_rank=1)
    manifest["spec"] |= {
        "numLayers": num_layers,
        "numExperts": num_experts,
        "ranks": ranks,
        "slotsPerRank": slots,
        "layers": [{"layer": i, "slots": table()} for i in range(layer_count)],
    }
    return manifest


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=_perturbed_placements())
def test_python_and_cel_agree_on_placements(cluster: Cluster, k2_crds: list[str], manifest: dict[str, Any]) -> None:
    try:
        ExpertPlacement.model_validate(manifest)
        python_accepts = True
    except pydantic.ValidationError:
        python_accepts = False
    result = _dry_run(cluster, manifest)
    assert (result.returncode == 0) == python_accepts, (manifest["spec"], result.stderr)


def test_explicit_null_in_an_optional_field_is_accepted(cluster: Cluster, k2_crds: list[str]) -> None:
    manifest = load_example("K2Training")
    manifest["spec"] |= {"ttlSecondsAfterFinished": None, "procsPerNode": None}
    manifest["spec"]["model"]["checkpointUri"] = None
    result = _dry_run(cluster, manifest)
    assert result.returncode == 0, result.stderr
    spec = K2Training.model_validate(json.loads(result.stdout)).spec
    assert spec.ttl_seconds_after_finished is None and spec.nproc_per_node == 1  # gpusPerNode 1
