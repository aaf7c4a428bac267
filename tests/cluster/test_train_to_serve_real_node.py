"""From training to serving on the real node: a K2Training trains k2-debug on the bundled corpus and exports it to its
checkpoint claim; a K2Serving whose spec.model.checkpointUri is the training's status.export.uri serves it.

The claim is a static `local` PersistentVolume on a directory of this machine (hack/localcluster/storage.py's
manifest, pre-bound to the claim), so the test reads the final checkpoint and the export from the host: the serving
rank's greedy completion of a corpus prefix (through kubectl port-forward on 127.0.0.1) must equal
`k2_workers.model.generate` on the final training checkpoint loaded in this process. Needs the worker image of this
tree (`make image`; `make test` builds it first).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_api.contract import Ports
from k2_workers.model import K2Config, K2ForCausalLM, generate, load_pretrained
from k2_workers.optim import MuonClip
from k2_workers.tokenizer import ByteTokenizer
from k2_workers.train.checkpoint_files import apply_checkpoint, read_checkpoint
from k2_workers.train.corpus import generate_corpus
from tests.cluster.real_node import has_real_node, skip_unless_a_real_node_can_run
from tests.operator.harness import running_operator
from tests.support.cluster import Cluster, load_local_cluster
from tests.support.kube import apply, get, has_condition, is_ready, items, port_forward, post_json
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

lc = load_local_cluster()
from localcluster import kubelet, storage  # noqa: E402  (on sys.path once the entry script is loaded)

pytestmark = pytest.mark.integration

CLAIM = "k2-train"
STEPS = 24
NEW_TOKENS = 16
PREFIX = generate_corpus()[0][:40]
TRAIN_TIMEOUT_S = 600  # image start, torch import and 24 CPU steps on a loaded 2-core machine
START_TIMEOUT_S = 240
REAL = {"nodeSelector": {"type": "real"}}


@pytest.fixture
def real(cluster: Cluster, k2_crds: list[str]) -> Iterator[Cluster]:
    if not has_real_node(cluster):
        skip_unless_a_real_node_can_run()
        skip_or_fail("the running cluster has no real node: `make cluster-down && make cluster-up` starts one")
    yield cluster


@contextmanager
def static_claim(cluster: Cluster, namespace: str, host_dir: Path) -> Iterator[None]:
    """`host_dir` as a local PersistentVolume on the real node, pre-bound to CLAIM (no StorageClass)."""
    host_dir.mkdir(parents=True, exist_ok=True)
    host_dir.chmod(0o777)  # the pods run as a non-root user
    volume_name = f"k2-test-{uuid.uuid4().hex[:10]}"
    volume = storage.local_volume(volume_name, host_dir, kubelet.NODE_NAME, capacity="1Gi", storage_class_name="")
    volume["spec"]["claimRef"] = {"namespace": namespace, "name": CLAIM}
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": volume_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    apply(cluster, volume)
    try:
        apply(cluster, claim, namespace=namespace)
        wait_for(f"claim {CLAIM} Bound", lambda: _phase(cluster, namespace) == "Bound")
        yield
    finally:  # the volume goes once its claim has (pv-protection); the namespace's deletion takes the claim
        cluster.kubectl("delete", "pv", volume_name, "--wait=false", "--ignore-not-found", check=False)


def _phase(cluster: Cluster, namespace: str) -> str | None:
    phase: str | None = get(cluster, "pvc", CLAIM, namespace=namespace).get("status", {}).get("phase")
    return phase


def training() -> dict[str, Any]:
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Training",
        "metadata": {"name": "to-serve"},
        "spec": {
            "model": {"preset": "k2-debug", "dtype": "fp32"},
            "image": "k2-operator/worker:dev",
            "numNodes": 1,
            "gpusPerNode": 1,
            "procsPerNode": 1,
            "resources": {"cpu": "500m", "memory": "1536Mi"},  # without a request a busy node starves the pod
            "scheduling": REAL,
            "optimizer": {"lr": 0.02, "adamLr": 0.003, "warmupSteps": 2, "decaySteps": 6},
            "data": {"corpus": "synthetic", "seqLen": 64, "batchSize": 4},
            "steps": STEPS,
            "checkpointing": {"claimName": CLAIM, "everyNSteps": 12, "keepLast": 1},
            "failurePolicy": {"maxRestarts": 0},
        },
    }


def serving(checkpoint_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Serving",
        "metadata": {"name": "trained"},
        "spec": {
            "model": {"preset": "k2-debug", "dtype": "fp32", "checkpointUri": checkpoint_uri},
            "image": "k2-operator/worker:dev",
            "groups": 1,
            "ranksPerGroup": 1,
            "gpusPerRank": 1,
            "redundantSlotsPerRank": 0,
            "resources": {"cpu": "250m", "memory": "1536Mi"},
            "scheduling": REAL,
            "frontend": {"replicas": 0},  # the test asks the rank itself
            "eplb": {"enabled": False},
        },
    }


def greedy(model: K2ForCausalLM) -> list[int]:
    prompt = torch.tensor([ByteTokenizer().encode(PREFIX)])
    with torch.no_grad():
        out = generate(model.eval(), prompt, NEW_TOKENS)
    return [int(t) for t in out[0, prompt.shape[1] :]]


def checkpoint_in_one_process(checkpoint: Path) -> K2ForCausalLM:
    model = K2ForCausalLM(K2Config.from_preset("k2-debug"))
    apply_checkpoint(read_checkpoint(checkpoint, 0, None), model, MuonClip(model, lr=0.02))
    return model


def _diagnose(cluster: Cluster, namespace: str) -> str:
    described = cluster.kubectl("describe", "pods", "-n", namespace, check=False).stdout
    logs = cluster.kubectl("logs", "-n", namespace, "-l", "app.kubernetes.io/name=k2", "--tail=30", check=False)
    return f"{described[-3000:]}\n{logs.stdout[-3000:]}{logs.stderr}"


@pytest.mark.timeout(TRAIN_TIMEOUT_S + START_TIMEOUT_S + 180)  # pyproject's 600 s is per test
def test_a_trained_model_is_served_from_its_export(real: Cluster, namespace: str, tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    with static_claim(real, namespace, volume), running_operator(real, namespace, tmp_path) as operator:
        apply(real, training(), namespace=namespace)
        try:
            done = wait_for(
                "K2Training Succeeded",
                lambda: (
                    has_condition(real, "k2training/to-serve", "Succeeded", namespace=namespace)
                    or has_condition(real, "k2training/to-serve", "Failed", namespace=namespace)
                ),
                TRAIN_TIMEOUT_S,
            )
        except AssertionError:
            raise AssertionError(_diagnose(real, namespace)) from None
        status = done["status"]
        assert has_condition(real, "k2training/to-serve", "Succeeded", namespace=namespace), status
        assert status["progress"]["step"] == STEPS
        export = status.get("export")
        assert export is not None, f"no status.export (is the worker image older than this tree?): {status}"
        assert (export["uri"], export["step"], export["dtype"]) == (f"pvc://{CLAIM}/export", STEPS, "fp32")

        expected = greedy(checkpoint_in_one_process(volume / f"step-{STEPS}"))
        assert greedy(load_pretrained(volume / "export")) == expected

        apply(real, serving(export["uri"]), namespace=namespace)
        selector = "app.kubernetes.io/instance=trained,app.kubernetes.io/component=rank"

        def ready_rank() -> dict[str, Any] | None:
            pods = items(real, "pods", namespace=namespace, selector=selector)
            return pods[0] if len(pods) == 1 and is_ready(pods[0]) else None

        try:
            rank = wait_for("the serving rank Ready", ready_rank, START_TIMEOUT_S)
        except AssertionError:
            raise AssertionError(_diagnose(real, namespace)) from None
        with port_forward(real, namespace, f"pod/{rank['metadata']['name']}", Ports.RANK_HTTP) as url:
            body = post_json(url + "/v1/generate", {"prompt": PREFIX, "max_new_tokens": NEW_TOKENS})
        print(f"served: {body['tokens']}\nin one process: {expected}")
        assert body["tokens"] == expected

        real.kubectl("delete", "-n", namespace, "k2serving/trained", "--wait=true", "--timeout=120s")
        assert operator.errors() == [], operator.logs()
