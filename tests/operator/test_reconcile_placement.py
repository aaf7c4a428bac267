"""The ExpertPlacement reconcile against the fake API server: a valid generation goes to the `-active` ConfigMap,
the ranks' reports become appliedGeneration, and an invalid spec is marked Invalid while the previous generation
stays in force."""

from __future__ import annotations

from k2_api import ExpertPlacement
from k2_api.contract import Annotations
from k2_operator import placement, serving
from k2_operator.builders.placement import active_config_name, active_generation
from tests.operator.fake_env import NS, Env, condition, controller_owner_uid, rank_pod

NAME = "k2-debug-serve"


def served() -> Env:
    """The example serving (2 groups x 2 ranks), reconciled once: its ExpertPlacement exists."""
    env = Env()
    env.create_example("k2serving-debug.yaml")
    env.run(serving.reconcile, NAME)
    return env


def report(env: Env, generation: int) -> None:
    """Every rank runs and reports `generation` on its Pod, as the serving workers do."""
    for group in (0, 1):
        for rank in (0, 1):
            pod = rank_pod(NAME, group, rank, annotations={Annotations.APPLIED_GENERATION: str(generation)})
            if env.user.create(pod) is None:
                current = env.get("Pod", pod["metadata"]["name"])
                version = current["metadata"]["resourceVersion"]
                env.user.merge_patch("Pod", NS, pod["metadata"]["name"], {"metadata": pod["metadata"]}, version)
            env.set_status("Pod", pod["metadata"]["name"], {"phase": "Running"}, manager="kubelet")


def test_a_valid_generation_goes_to_the_active_config_map() -> None:
    env = served()
    env.run(placement.reconcile, NAME)
    active = env.get("ConfigMap", active_config_name(NAME))
    assert active_generation(active) == 1
    assert controller_owner_uid(active) == env.get(ExpertPlacement.KIND, NAME)["metadata"]["uid"]
    body = env.get(ExpertPlacement.KIND, NAME)
    assert condition(body, "Invalid")["status"] == "False"
    assert (body["status"]["appliedRanks"], body["status"]["totalRanks"]) == (0, 4)
    assert env.status_writes(ExpertPlacement.KIND) == 1
    env.run(placement.reconcile, NAME)
    assert env.status_writes(ExpertPlacement.KIND) == 1


def test_the_ranks_reports_become_the_applied_generation() -> None:
    env = served()
    env.run(placement.reconcile, NAME)
    report(env, 1)
    env.run(placement.reconcile, NAME)
    body = env.get(ExpertPlacement.KIND, NAME)
    assert body["status"]["appliedGeneration"] == 1 and body["status"]["appliedRanks"] == 4
    assert condition(body, "Applied")["status"] == "True"


def test_an_invalid_spec_is_marked_and_the_previous_generation_stays_in_force() -> None:
    env = served()
    env.run(placement.reconcile, NAME)
    current = env.get(ExpertPlacement.KIND, NAME)
    layers = current["spec"]["layers"]
    (first,) = [entry for entry in layers if entry["layer"] == 0]
    first["slots"] = [[0, 1, 2, 3, 4], [5, 6, 0, 1, 2]]  # expert 7 has no replica
    version = current["metadata"]["resourceVersion"]
    patch = {"spec": {"generation": 2, "layers": layers}}
    env.cluster.client("k2-eplb").merge_patch(ExpertPlacement.KIND, NS, NAME, patch, version)
    env.run(placement.reconcile, NAME)
    body = env.get(ExpertPlacement.KIND, NAME)
    invalid = condition(body, "Invalid")
    assert (
        invalid["status"] == "True" and "spec.layers[layer=0].slots: experts without a replica: 7" in invalid["message"]
    )
    assert active_generation(env.get("ConfigMap", active_config_name(NAME))) == 1
    assert ("Warning", "Invalid") in env.events()
