"""What a K2Training becomes on Ray Train (pure, no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k2_api.serving import K2Serving
from k2_api.training import K2Training
from k2_workers.ray_run.cluster import on_loopback, target
from k2_workers.ray_run.rank_actor import local_device_index
from k2_workers.ray_run.serve_plan import plan_serving
from k2_workers.ray_run.train_plan import choose_gpu, plan_training

from .run import manifest


def _training(tmp_path: Path, **spec: object) -> K2Training:
    document = yaml.safe_load(manifest(tmp_path).read_text())
    document["spec"].update(spec)
    return K2Training.model_validate(document)


def test_the_gang_restart_budget_and_storage_map_to_ray_train(tmp_path: Path) -> None:
    training = _training(tmp_path, numNodes=2, procsPerNode=3, failurePolicy={"maxRestarts": 5})
    plan = plan_training(training, cluster_gpus=0, storage_path=str(tmp_path / "runs"))
    assert (plan.num_workers, plan.max_failures, plan.use_gpu, plan.backend) == (6, 5, False, "gloo")
    assert plan.run_dir == tmp_path / "runs" / "k2-debug-train"
    assert Path(plan.checkpoint_dir) == plan.run_dir / "checkpoints"
    assert (plan.num_cpus, plan.placement_strategy, plan.device) == (6, "PACK", "cpu")


def test_a_checkpoint_uri_is_used_as_the_checkpoint_directory(tmp_path: Path) -> None:
    checkpointing = {"uri": f"file://{tmp_path}/ckpt", "everyNSteps": 5}
    plan = plan_training(_training(tmp_path, checkpointing=checkpointing), cluster_gpus=0, storage_path="/x")
    assert plan.checkpoint_dir == f"{tmp_path}/ckpt"


def test_gpus_only_when_asked_for_and_present() -> None:
    assert choose_gpu("auto", gpus_per_node=1, cluster_gpus=2, num_workers=2)
    assert not choose_gpu("auto", gpus_per_node=1, cluster_gpus=1, num_workers=2)
    assert not choose_gpu("auto", gpus_per_node=0, cluster_gpus=8, num_workers=2)
    assert choose_gpu("cuda", gpus_per_node=0, cluster_gpus=0, num_workers=2)
    assert not choose_gpu("cpu", gpus_per_node=8, cluster_gpus=8, num_workers=2)
    with pytest.raises(ValueError, match="--device"):
        choose_gpu("tpu", gpus_per_node=8, cluster_gpus=8, num_workers=2)


def test_bad_options_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--placement-strategy"):
        plan_training(_training(tmp_path), cluster_gpus=0, placement_strategy="ANYWHERE")
    with pytest.raises(ValueError, match="--cpus-per-worker"):
        plan_training(_training(tmp_path), cluster_gpus=0, cpus_per_worker=0)


def test_the_address_comes_from_the_flag_then_ray_address_else_a_local_instance() -> None:
    assert target("ray://a:10001", {"RAY_ADDRESS": "b:6379"}, 2).address == "ray://a:10001"
    assert target(None, {"RAY_ADDRESS": "b:6379"}, 2).address == "b:6379"
    assert target(None, {}, 2).local
    with pytest.raises(ValueError, match="--num-cpus"):
        target(None, {}, 0)


def test_each_serving_group_is_one_placement_group_of_rank_bundles() -> None:
    document = yaml.safe_load((Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml").read_text())
    plan = plan_serving(K2Serving.model_validate(document), cluster_gpus=0, cpus_per_rank=0.5)
    assert (plan.groups, plan.ranks_per_group, plan.use_gpu) == (2, 2, False)
    assert plan.bundles == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert (plan.num_cpus, plan.host, plan.port) == (2, "127.0.0.1", 8000)
    on_gpus = plan_serving(K2Serving.model_validate(document), cluster_gpus=4, port=9000)
    assert on_gpus.use_gpu and on_gpus.bundles == [{"CPU": 1.0, "GPU": 1.0}] * 2 and on_gpus.port == 9000


def test_a_rank_uses_the_gpu_ray_assigned_only_when_it_sees_them_all() -> None:
    assert local_device_index([3], all_visible=True) == 3
    assert local_device_index([3], all_visible=False) == 0  # Ray masked CUDA_VISIBLE_DEVICES to that one GPU
    assert local_device_index([], all_visible=True) == 0


def test_a_cluster_on_loopback_is_told_apart() -> None:
    assert on_loopback("127.0.0.1:6379") and on_loopback("ray://localhost:10001") and on_loopback("[::1]:6379")
    assert not on_loopback("ray://head.ray.svc:10001") and not on_loopback("10.0.0.2:6379")
