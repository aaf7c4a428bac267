"""A resume that fell back past unreadable checkpoints: rank 0 reports it in status.progress.checkpointFallback, the
operator turns it into the CheckpointFallback condition and posts one Warning event; a clean resume clears it."""

from __future__ import annotations

from typing import Any

from k2_api import K2Training
from k2_operator.status import training as training_status
from k2_operator.training import reconcile
from tests.operator.fake_env import Env, condition
from tests.operator.resources import training

FILE = "k2training-debug.yaml"
NAME = "k2-debug-train"
TRAINER = "k2-trainer"  # rank 0's status writes, as another field manager
FALLBACK = {
    "resumedFrom": "/checkpoints/step-10",
    "resumedStep": 10,
    "skipped": [{"step": 15, "path": "/checkpoints/step-15", "reason": "tensors.safetensors: SHA-256 differs"}],
}


def _progress(fallback: dict[str, Any] | None) -> dict[str, Any]:
    progress: dict[str, Any] = {"step": 11, "loss": 2.5, "lastCheckpoint": "/checkpoints/step-10"}
    return {"progress": progress | ({"checkpointFallback": fallback} if fallback is not None else {})}


def test_the_message_names_the_skipped_checkpoints_why_and_where_the_gang_resumed() -> None:
    resource = K2Training.model_validate(
        training().model_dump(mode="json", by_alias=True, exclude_none=True) | {"status": _progress(FALLBACK)}
    )
    desired = training_status.checkpoint_fallback(resource, [])
    assert desired is not None and desired.status and desired.reason == "UnreadableCheckpoint"
    assert desired.message == (
        "resumed from step 10 (/checkpoints/step-10); "
        "skipped step 15 at /checkpoints/step-15 (tensors.safetensors: SHA-256 differs)"
    )
    nothing_left = FALLBACK | {"resumedFrom": None, "resumedStep": None}
    resource = K2Training.model_validate(
        training().model_dump(mode="json", by_alias=True, exclude_none=True) | {"status": _progress(nothing_left)}
    )
    desired = training_status.checkpoint_fallback(resource, [])
    assert desired is not None and desired.message.startswith("no readable checkpoint was left: started again")


def test_without_a_fallback_there_is_no_such_condition_and_no_event() -> None:
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    env.set_status(K2Training.KIND, NAME, _progress(None), manager=TRAINER)
    env.run(reconcile, NAME)
    conditions = env.get(K2Training.KIND, NAME)["status"]["conditions"]
    assert "CheckpointFallback" not in {c["type"] for c in conditions}
    assert not [e for e in env.events() if "CheckpointFallback" in e[1]]


def test_a_reported_fallback_posts_one_warning_event_and_a_clean_resume_clears_it() -> None:
    env = Env()
    env.create_example(FILE)
    env.run(reconcile, NAME)
    env.set_status(K2Training.KIND, NAME, _progress(FALLBACK), manager=TRAINER)
    env.run(reconcile, NAME)
    found = condition(env.get(K2Training.KIND, NAME), "CheckpointFallback")
    assert found["status"] == "True" and "skipped step 15 at /checkpoints/step-15" in found["message"]
    [event] = [e for e in env.user.list("Event", "ns1") if e["reason"] == "CheckpointFallback"]
    assert event["type"] == "Warning" and event["message"] == found["message"]
    assert event["involvedObject"]["name"] == NAME

    env.run(reconcile, NAME)  # level-based: the same report posts nothing again
    assert env.events().count(("Warning", "CheckpointFallback")) == 1

    env.set_status(K2Training.KIND, NAME, _progress(None), manager=TRAINER)  # the next gang resumed from its newest
    env.run(reconcile, NAME)
    cleared = condition(env.get(K2Training.KIND, NAME), "CheckpointFallback")
    assert cleared["status"] == "False" and cleared["reason"] == "ResumedFromNewest"
    assert ("Normal", "CheckpointFallbackCleared") in env.events()


def test_a_very_long_fallback_still_fits_a_condition() -> None:
    many = FALLBACK | {"skipped": [{"step": s, "path": f"/c/step-{s}", "reason": "x" * 4096} for s in range(100)]}
    resource = K2Training.model_validate(
        training().model_dump(mode="json", by_alias=True, exclude_none=True) | {"status": _progress(many)}
    )
    desired = training_status.checkpoint_fallback(resource, [])
    assert desired is not None and len(desired.message) == training_status.MAX_CONDITION_MESSAGE
    assert desired.message.startswith("resumed from step 10 (/checkpoints/step-10); skipped step 0 at /c/step-0 (")
