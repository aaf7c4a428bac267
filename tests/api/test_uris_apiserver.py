"""The API server refuses storage URIs the workers cannot read, naming the field, and agrees with k2_api.uris."""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from k2_api import K2Serving, K2Training
from tests.api.manifests import load_example
from tests.support.cluster import Cluster

pytestmark = pytest.mark.integration

# (kind, path of the field in spec, its name in messages)
FIELDS = [
    ("K2Serving", ("model", "checkpointUri"), "spec.model.checkpointUri"),
    ("K2Training", ("model", "checkpointUri"), "spec.model.checkpointUri"),
    ("K2Training", ("data", "uri"), "spec.data.uri"),
]
BAD = ["s3://bucket/k2", "models/k2", "pvc://Weights/k2", "pvc://weights/../../etc", "pvc:///k2", "hf://org/model"]
GOOD = ["pvc://weights/k2-debug", "pvc://weights", "file:///models/k2", "/models/k2"]


def _with(kind: str, path: tuple[str, str], value: str) -> dict[str, Any]:
    body = copy.deepcopy(load_example(kind))
    section = body["spec"].setdefault(path[0], {})
    if path == ("data", "uri"):
        section.pop("corpus", None)
    section[path[1]] = value
    return body


def _server_accepts(cluster: Cluster, body: dict[str, Any]) -> tuple[bool, str]:
    text = yaml.safe_dump(body)
    result = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "-n", "default", "-f", "-", input=text, check=False
    )
    return result.returncode == 0, result.stderr


def _python_accepts(kind: str, body: dict[str, Any]) -> bool:
    model = {"K2Serving": K2Serving, "K2Training": K2Training}[kind]
    try:
        model.model_validate(body)
    except pydantic.ValidationError:
        return False
    return True


@pytest.mark.parametrize("uri", BAD)
@pytest.mark.parametrize(("kind", "path", "field"), FIELDS, ids=[f"{k}:{f}" for k, _, f in FIELDS])
def test_a_bad_uri_is_refused_naming_the_field(
    cluster: Cluster, k2_crds: list[str], kind: str, path: tuple[str, str], field: str, uri: str
) -> None:
    body = _with(kind, path, uri)
    accepted, stderr = _server_accepts(cluster, body)
    assert not accepted
    assert f"{field}: Invalid value" in stderr, stderr
    assert not _python_accepts(kind, body)


@pytest.mark.parametrize("uri", GOOD)
@pytest.mark.parametrize(("kind", "path", "field"), FIELDS, ids=[f"{k}:{f}" for k, _, f in FIELDS])
def test_the_advertised_forms_are_accepted(
    cluster: Cluster, k2_crds: list[str], kind: str, path: tuple[str, str], field: str, uri: str
) -> None:
    body = _with(kind, path, uri)
    accepted, stderr = _server_accepts(cluster, body)
    assert accepted, stderr
    assert _python_accepts(kind, body)


def test_a_checkpoint_directory_uri_must_be_local(cluster: Cluster, k2_crds: list[str]) -> None:
    body = _with("K2Training", ("checkpointing", "uri"), "pvc://ckpt/run")
    accepted, stderr = _server_accepts(cluster, body)
    assert not accepted
    assert "spec.checkpointing.uri: Invalid value" in stderr, stderr
    assert not _python_accepts("K2Training", body)


URI = st.one_of(
    st.builds(
        "{}{}".format,
        st.sampled_from(["pvc://", "file://", "/", "", "s3://"]),
        st.text(st.sampled_from("ab-./_Z9.\n"), max_size=14),
    ),
    st.text(max_size=12),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(URI)
@example("pvc://weights/..\n")  # a segment "..\n" is a name, not the parent: RE2's `$` is the end of the text only
@example("pvc://weights/a\nb")
@example("file:///\n")
def test_python_and_cel_agree_on_uris(cluster: Cluster, k2_crds: list[str], uri: str) -> None:
    body = _with("K2Serving", ("model", "checkpointUri"), uri)
    server, stderr = _server_accepts(cluster, body)
    assert server == _python_accepts("K2Serving", body), (uri, stderr)
