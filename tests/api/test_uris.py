"""k2_api.uris: the storage URIs of checkpointUri and data.uri, parsed and resolved to where a worker pod reads them."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from k2_api import K2Serving, claims, uris
from k2_api.contract import Files
from tests.api.manifests import load_example

FIELD = "spec.model.checkpointUri"
LABEL = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
CLAIM = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda c: len(c) <= uris.MAX_CLAIM_LENGTH)
SEGMENT = st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=8).filter(lambda s: s != "..")


@given(CLAIM, st.lists(SEGMENT, max_size=5))
def test_a_claim_path_resolves_under_the_claims_mount(claim: str, segments: list[str]) -> None:
    uri = f"pvc://{claim}/{'/'.join(segments)}"
    parsed = uris.parse(uri, FIELD)
    assert parsed.claim == claim
    kept = [s for s in segments if s != "."]
    assert parsed.path == "/".join(kept)
    mount = f"{Files.CLAIMS_ROOT}/{claim}"
    assert claims.local_path(uri, FIELD) == (f"{mount}/{parsed.path}" if kept else mount)


@given(st.text(max_size=60))
def test_no_accepted_claim_uri_escapes_its_claim(rest: str) -> None:
    uri = f"pvc://{rest}"
    try:
        parsed = uris.parse(uri, FIELD)
    except ValueError as error:
        assert FIELD in str(error)
        return
    assert parsed.claim is not None
    mount = f"{Files.CLAIMS_ROOT}/{parsed.claim}"
    resolved = posixpath.normpath(claims.local_path(uri, FIELD))
    assert resolved == mount or resolved.startswith(mount + "/")


@given(CLAIM, st.lists(SEGMENT, max_size=3), st.lists(SEGMENT, max_size=3))
def test_a_parent_segment_is_refused(claim: str, before: list[str], after: list[str]) -> None:
    uri = f"pvc://{claim}/{'/'.join([*before, '..', *after])}"
    with pytest.raises(ValueError, match=r"spec\.model\.checkpointUri: .* climbs out of the claim"):
        uris.parse(uri, FIELD)


@pytest.mark.parametrize(
    "claim",
    ["", "Weights", "my_claim", "-weights", "weights-", "a..b", ".a", "a.", "a:b", "x" * 254, "wéights", "a b"],
    ids=repr,
)
def test_odd_claim_names_are_refused(claim: str) -> None:
    with pytest.raises(ValueError, match="is not a PersistentVolumeClaim name"):
        uris.parse(f"pvc://{claim}/model", FIELD)


@pytest.mark.parametrize("path", ["...", "..a", "a..", "..\n", ".hidden"])
def test_names_that_only_look_like_a_parent_are_paths(path: str) -> None:
    assert uris.parse(f"pvc://c/{path}", FIELD).path == path


def test_a_253_character_claim_is_a_claim() -> None:
    claim = ".".join(["a" * 63] * 4)[:253].rstrip(".")
    assert uris.parse(f"pvc://{claim}", FIELD).claim == claim


@pytest.mark.parametrize(
    ("uri", "path"),
    [("file:///models/k2", "/models/k2"), ("/models/k2", "/models/k2"), ("file:///models/../k2", "/models/../k2")],
)
def test_local_paths_are_read_as_they_are(uri: str, path: str) -> None:
    assert uris.parse(uri, FIELD) == uris.StorageUri(claim=None, path=path)
    assert claims.local_path(uri, FIELD) == path
    assert uris.local_only(uri, "spec.checkpointing.uri") == path


@pytest.mark.parametrize("uri", ["s3://bucket/k2", "models/k2", "file://host/models", "hf://moonshotai/Kimi-K2", ""])
def test_other_forms_are_refused_naming_the_field(uri: str) -> None:
    with pytest.raises(ValueError, match=r"^spec\.model\.checkpointUri must be file:///"):
        uris.parse(uri, FIELD)


def test_a_checkpoint_directory_may_not_be_a_read_only_claim() -> None:
    with pytest.raises(ValueError, match=r"spec\.checkpointing\.uri must be file:///"):
        uris.local_only("pvc://ckpt/run", "spec.checkpointing.uri")


def test_the_models_refuse_a_bad_uri_with_the_api_servers_message() -> None:
    body = load_example("K2Serving")
    body["spec"]["model"]["checkpointUri"] = "s3://bucket/k2"
    with pytest.raises(ValueError, match=r"spec\.model\.checkpointUri must be file:///"):
        K2Serving.model_validate(body)
    body["spec"]["model"]["checkpointUri"] = "pvc://weights/k2"
    assert K2Serving.model_validate(body).spec.model.checkpoint_uri == "pvc://weights/k2"


def test_claims_of_ignores_local_paths_and_duplicates() -> None:
    from k2_operator.builders.common import claims_of

    found = claims_of({"a": "pvc://b/x", "b": "/local", "c": None, "d": "pvc://a", "e": "pvc://b/y"})
    assert found == ["a", "b"]
