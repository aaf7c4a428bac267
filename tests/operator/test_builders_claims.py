"""Claims named by pvc:// URIs are mounted read-only on the worker pods; the frontend follows spec.scheduling.

Goldens: tests/operator/golden/k2serving-claims.yaml and k2training-claims.yaml (regenerate with K2_UPDATE_GOLDEN=1,
as tests/operator/test_builders.py says).
"""

from __future__ import annotations

from typing import Any

from k2_api import claims
from k2_api.contract import Files
from k2_operator.builders import serving as serving_builder
from k2_operator.builders import training as training_builder
from tests.operator.resources import serving, training
from tests.operator.test_builders import check_golden

SCHEDULING = {
    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
            }
        }
    },
    "priorityClassName": "inference",
}
WEIGHTS = "pvc://k2-weights/debug/step-40"
MODEL = {"preset": "k2-debug", "dtype": "fp32", "checkpointUri": WEIGHTS}


def _claims_serving() -> Any:
    return serving(model=MODEL, scheduling=SCHEDULING)


def _claims_training() -> Any:
    return training(
        model={"preset": "k2-debug", "checkpointUri": "pvc://ckpt/export"},
        data={"uri": "pvc://corpus.v2/shards", "seqLen": 64},
        checkpointing={"claimName": "ckpt", "everyNSteps": 10},
    )


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return pod


def _mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (container,) = pod["containers"]
    return {mount["mountPath"]: mount for mount in container["volumeMounts"]}


def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in pod["volumes"]}


def test_serving_claims_golden() -> None:
    s = _claims_serving()
    check_golden("k2serving-claims", [serving_builder.group_stateful_set(s, 0), serving_builder.frontend_deployment(s)])


def test_training_claims_golden() -> None:
    check_golden("k2training-claims", [training_builder.job(_claims_training(), attempt=0)])


def test_the_rank_reads_the_checkpoint_where_the_claim_is_mounted_read_only() -> None:
    pod = _pod(serving_builder.group_stateful_set(_claims_serving(), 0))
    mount_path = f"{Files.CLAIMS_ROOT}/k2-weights"
    mount = _mounts(pod)[mount_path]
    assert mount["readOnly"] is True
    assert _volumes(pod)[mount["name"]]["persistentVolumeClaim"] == {"claimName": "k2-weights", "readOnly": True}
    # The worker's resolver lands inside that mount.
    assert claims.local_path(WEIGHTS, "spec.model.checkpointUri") == f"{mount_path}/debug/step-40"
    # Pod Security "restricted": no hostPath, the claim is the only new volume type.
    assert not any("hostPath" in volume for volume in pod["volumes"])


def test_a_local_checkpoint_adds_no_claim() -> None:
    pod = _pod(serving_builder.group_stateful_set(serving(model={**MODEL, "checkpointUri": "file:///models/k2"}), 0))
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert not [path for path in _mounts(pod) if path.startswith(Files.CLAIMS_ROOT)]


def test_a_changed_claim_restarts_the_groups() -> None:
    before = serving_builder.rank_template_hash(_claims_serving())
    after = serving_builder.rank_template_hash(serving(model={**MODEL, "checkpointUri": "pvc://other/debug"}))
    assert before != after


def test_training_mounts_model_and_data_claims_and_shares_the_checkpoint_claims_volume() -> None:
    pod = _pod(training_builder.job(_claims_training(), attempt=0))
    mounts, volumes = _mounts(pod), _volumes(pod)
    checkpoints = mounts["/checkpoints"]
    assert checkpoints.get("readOnly") is not True  # the trainer writes checkpoints there
    # The checkpoint claim is also the model's: the same volume, mounted a second time read-only.
    model_mount = mounts[f"{Files.CLAIMS_ROOT}/ckpt"]
    assert model_mount == {"name": checkpoints["name"], "mountPath": f"{Files.CLAIMS_ROOT}/ckpt", "readOnly": True}
    assert volumes[checkpoints["name"]]["persistentVolumeClaim"] == {"claimName": "ckpt"}
    data_mount = mounts[f"{Files.CLAIMS_ROOT}/corpus.v2"]
    assert data_mount["readOnly"] is True
    assert volumes[data_mount["name"]]["persistentVolumeClaim"] == {"claimName": "corpus.v2", "readOnly": True}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert sorted(claims) == ["ckpt", "corpus.v2"]  # one volume per claim


def test_the_frontend_is_scheduled_like_the_ranks() -> None:
    s = _claims_serving()
    rank = _pod(serving_builder.group_stateful_set(s, 0))
    frontend = _pod(serving_builder.frontend_deployment(s))
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert frontend[key] == rank[key] == SCHEDULING[key], key
    assert "schedulerName" not in frontend  # unset stays unset
    plain = _pod(serving_builder.frontend_deployment(serving()))
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(plain)
