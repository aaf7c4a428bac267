"""pvc:// on the real node: a K2Serving serves a checkpoint the test wrote to a PersistentVolume; a K2Training
reads its corpus and starting weights from a claim and checkpoints into the same claim.

The test writes a k2-debug safetensors checkpoint (seed 1234, not the seed-0 weights a rank builds without one) into
a host directory, exposes it as a `local` PersistentVolume (hack/localcluster/storage.py's manifest) bound to a claim,
and runs a 1-group x 1-rank K2Serving with `spec.model.checkpointUri: pvc://<claim>/<dir>` in a namespace that
enforces Pod Security "restricted". The rank's greedy completion, through its HTTP port (kubectl port-forward on
127.0.0.1), must equal `k2_workers.model.generate` on the same checkpoint in this process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from k2_api.contract import Files, Ports
from k2_workers.model import K2Config, K2ForCausalLM, generate, load_pretrained, save_pretrained
from k2_workers.tokenizer import load_tokenizer
from tests.cluster.real_node import has_real_node, skip_unless_a_real_node_can_run
from tests.operator.harness import running_operator
from tests.support.cluster import Cluster, load_local_cluster
from tests.support.kube import apply, get, has_condition, is_ready, items, port_forward, post_json
from tests.support.prerequisites import skip_or_fail
from tests.support.waits import wait_for

lc = load_local_cluster()
from localcluster import kubelet, storage  # noqa: E402  (on sys.path once the entry script is loaded)

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240  # a rank's first start on a loaded 2-core machine: torch import, checkpoint load
PROMPT = "The experts of layer one"
MAX_NEW_TOKENS = 12
CHECKPOINT_SEED = 1234
CHECKPOINT_DIR = "k2-debug/step-0"


@pytest.fixture
def real(cluster: Cluster, k2_crds: list[str]) -> Iterator[Cluster]:
    if not has_real_node(cluster):
        skip_unless_a_real_node_can_run()
        skip_or_fail("the running cluster has no real node: `make cluster-down && make cluster-up` starts one")
    yield cluster


@pytest.fixture
def restricted(real: Cluster, namespace: str) -> str:
    """The test namespace, enforcing Pod Security "restricted" (the claim volume must pass it)."""
    real.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    return namespace


@contextmanager
def static_claim(cluster: Cluster, namespace: str, claim: str, host_dir: Path) -> Iterator[None]:
    """`host_dir` as a local PersistentVolume on the real node, pre-bound to claim `claim` (no StorageClass)."""
    host_dir.mkdir(parents=True, exist_ok=True)
    host_dir.chmod(0o777)
    volume_name = f"k2-test-{uuid.uuid4().hex[:10]}"
    volume = storage.local_volume(volume_name, host_dir, kubelet.NODE_NAME, capacity="1Gi", storage_class_name="")
    volume["spec"]["claimRef"] = {"namespace": namespace, "name": claim}
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "volumeName": volume_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    apply(cluster, volume)
    try:
        apply(cluster, pvc, namespace=namespace)
        wait_for(
            f"claim {claim} Bound",
            lambda: get(cluster, "pvc", claim, namespace=namespace).get("status", {}).get("phase") == "Bound",
        )
        yield
    finally:
        # The volume goes once its claim has (pv-protection); the namespace's deletion takes the claim.
        cluster.kubectl("delete", "pv", volume_name, "--wait=false", "--ignore-not-found", check=False)


def write_checkpoint(directory: Path) -> None:
    torch.manual_seed(CHECKPOINT_SEED)
    save_pretrained(K2ForCausalLM(K2Config.from_preset("k2-debug")), directory)
    # save_pretrained leaves its shards 0600 (a private temporary file renamed); the rank runs as uid 1000.
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def greedy(checkpoint: Path | None, text: str, max_new_tokens: int) -> list[int]:
    """`generate` in this process: on `checkpoint`, or on the seed-0 weights a rank builds without one."""
    if checkpoint is None:
        torch.manual_seed(0)
        model = K2ForCausalLM(K2Config.from_preset("k2-debug"))
    else:
        model = load_pretrained(checkpoint)
    prompt = torch.tensor([load_tokenizer(checkpoint).encode(text)])
    with torch.no_grad():
        out = generate(model.eval(), prompt, max_new_tokens)
    tokens: list[int] = out[0, prompt.shape[1] :].tolist()
    return tokens


def serving(checkpoint_uri: str) -> dict[str, Any]:
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Serving",
        "metadata": {"name": "claims-serve"},
        "spec": {
            "model": {"preset": "k2-debug", "dtype": "fp32", "checkpointUri": checkpoint_uri},
            "image": "k2-operator/worker:dev",
            "groups": 1,
            "ranksPerGroup": 1,
            "gpusPerRank": 1,
            "redundantSlotsPerRank": 0,  # one rank holds all 8 experts: 8 slots, no replica
            "resources": {"cpu": "250m", "memory": "2Gi"},
            "scheduling": {"nodeSelector": {"type": "real"}},
            "frontend": {"replicas": 1},
            "eplb": {"enabled": False},
        },
    }


def _ready_pods(cluster: Cluster, namespace: str, selector: str, count: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = items(cluster, "pods", namespace=namespace, selector=selector)
        return pods if len(pods) == count and all(is_ready(p) for p in pods) else None

    try:
        pods: list[dict[str, Any]] = wait_for(f"{count} Ready pods {selector}", ready, START_TIMEOUT_S)
    except AssertionError:
        described = cluster.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False).stdout
        logs = cluster.kubectl("logs", "-n", namespace, "-l", selector, "--tail=40", check=False)
        raise AssertionError(f"{described[-4000:]}\n{logs.stdout}{logs.stderr}") from None
    return pods


def test_a_serving_loads_its_checkpoint_from_a_claim(real: Cluster, restricted: str, tmp_path: Path) -> None:
    namespace, claim = restricted, "k2-weights"
    volume = tmp_path / "volume"
    write_checkpoint(volume / CHECKPOINT_DIR)
    expected = greedy(volume / CHECKPOINT_DIR, PROMPT, MAX_NEW_TOKENS)
    assert expected != greedy(None, PROMPT, MAX_NEW_TOKENS)  # the rank can only match by reading the checkpoint

    with static_claim(real, namespace, claim, volume), running_operator(real, namespace, tmp_path) as operator:
        apply(real, serving(f"pvc://{claim}/{CHECKPOINT_DIR}"), namespace=namespace)
        base = "app.kubernetes.io/instance=claims-serve,app.kubernetes.io/component="
        (rank,) = _ready_pods(real, namespace, base + "rank", count=1)
        (frontend,) = _ready_pods(real, namespace, base + "frontend", count=1)
        # spec.scheduling reaches the frontend too: both run on the real node.
        assert rank["spec"]["nodeName"] == frontend["spec"]["nodeName"] == kubelet.NODE_NAME
        (container,) = rank["spec"]["containers"]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == f"{Files.CLAIMS_ROOT}/{claim}")
        assert mount["readOnly"] is True

        with port_forward(real, namespace, f"pod/{rank['metadata']['name']}", Ports.RANK_HTTP) as url:
            body = post_json(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS})
        print(f"rank: {body['tokens']}\nlocal: {expected}")
        assert body["tokens"] == expected
        assert body["promptTokens"] == len(load_tokenizer(volume / CHECKPOINT_DIR).encode(PROMPT))

        real.kubectl("delete", "-n", namespace, "k2serving/claims-serve", "--wait=true", "--timeout=120s")
        wait_for("the rank pods gone", lambda: not items(real, "pods", namespace=namespace, selector=base + "rank"))
        assert operator.errors() == [], operator.logs()


CORPUS = "\n\n".join(f"Paragraph {i}: the router sends each token to two of eight experts." for i in range(60))


def training(claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "k2.ai/v1alpha1",
        "kind": "K2Training",
        "metadata": {"name": "claims-train"},
        "spec": {
            "model": {"preset": "k2-debug", "checkpointUri": f"pvc://{claim}/base"},
            "image": "k2-operator/worker:dev",
            "numNodes": 1,
            "gpusPerNode": 0,
            "resources": {"cpu": "500m", "memory": "2Gi"},
            "scheduling": {"nodeSelector": {"type": "real"}},
            "data": {"uri": f"pvc://{claim}/corpus.txt", "seqLen": 32, "batchSize": 2},
            "steps": 4,
            "optimizer": {"warmupSteps": 1, "decaySteps": 1},
            "checkpointing": {"claimName": claim, "everyNSteps": 2},
            "failurePolicy": {"maxRestarts": 0},
        },
    }


def test_a_training_reads_and_checkpoints_on_one_claim(real: Cluster, restricted: str, tmp_path: Path) -> None:
    namespace, claim = restricted, "k2-train"
    volume = tmp_path / "volume"
    write_checkpoint(volume / "base")
    (volume / "corpus.txt").write_text(CORPUS)
    (volume / "corpus.txt").chmod(0o644)

    with static_claim(real, namespace, claim, volume), running_operator(real, namespace, tmp_path) as operator:
        apply(real, training(claim), namespace=namespace)
        selector = "app.kubernetes.io/instance=claims-train"
        # The claim is one volume, mounted read-write for checkpoints and read-only for the corpus and weights.
        (pod,) = wait_for("the worker pod", lambda: items(real, "pods", namespace=namespace, selector=selector))
        (container,) = pod["spec"]["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/checkpoints"]["name"] == mounts[f"{Files.CLAIMS_ROOT}/{claim}"]["name"]
        assert mounts[f"{Files.CLAIMS_ROOT}/{claim}"]["readOnly"] is True
        # Without the mounted claim the worker could read neither its corpus nor its weights, and the run would fail.
        try:
            wait_for(
                "the training Succeeded",
                lambda: has_condition(real, "k2training/claims-train", "Succeeded", namespace=namespace),
                START_TIMEOUT_S,
            )
        except AssertionError:
            logs = real.kubectl("logs", "-n", namespace, "-l", selector, "--tail=40", check=False)
            status = get(real, "k2training/claims-train", namespace=namespace).get("status")
            raise AssertionError(f"{status}\n{logs.stdout}{logs.stderr}") from None
        # The non-root trainer wrote its checkpoints into the claim (the kubelet gave the volume to its fsGroup).
        complete = sorted(p.parent.name for p in volume.glob("step-*/COMPLETE"))
        assert complete and complete[-1] == "step-4", sorted(p.name for p in volume.iterdir())
        assert (volume / "step-4").stat().st_uid == 1000  # written by the pod's user, not by this test
        real.kubectl("delete", "-n", namespace, "k2training/claims-train", "--wait=true", "--timeout=120s")
        assert operator.errors() == [], operator.logs()
