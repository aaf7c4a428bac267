"""Children of a K2Training: headless Service, config ConfigMap, the workers' RBAC, and one Indexed Job per attempt.

The gang is an Indexed Job with completions = parallelism = numNodes and backoffLimit 0: the first failed worker
fails the Job, whose controller then stops the others; the operator restarts the whole gang by creating the Job of
the next attempt (`<name>-worker-<attempt>`), which resumes from the last checkpoint. Preemption is told apart by
the Job's podFailurePolicy: a worker that exits `ExitCodes.PREEMPTED` (SIGTERM answered with a checkpoint) or a pod
with the `DisruptionTarget` condition (eviction, node drain, scheduler preemption) fails the Job with reason
`PodFailurePolicy` (`PREEMPTED_REASON`), which the operator restarts without counting it against maxRestarts;
every other failure ends in `BackoffLimitExceeded`. `spec.suspend` maps onto the Job's own suspend (pods deleted,
Job and status kept). Pod hostnames are `<job>-<index>` under the headless Service, so rank 0 is reachable at
`<job>-0.<name>-workers.<namespace>.svc` before it is Ready.
"""

from __future__ import annotations

from typing import Any

import yaml

from k2_api import K2Training
from k2_api.contract import Annotations, Env, ExitCodes, Files, Labels, PortNames, Ports, TorchrunEnv
from k2_operator.builders.common import (
    Manifest,
    claim_volumes,
    claims_of,
    container_security_context,
    content_hash,
    metadata,
    pod_security_context,
    propagated_annotations,
    resources,
    scheduling_fields,
    selector_labels,
    worker_rbac,
    writable_tmp,
)

COMPONENT = "trainer"
CHECKPOINT_VOLUME = "checkpoints"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
PREEMPTED_REASON = "PodFailurePolicy"
"""The Job's Failed reason when a podFailurePolicy rule matched: all our FailJob rules are preemptions."""
PREEMPTIONS_ANNOTATION = "k2.ai/preemptions"
"""On each Job: the preemptions before its attempt (attempt = restarts + preemptions), so status can be rebuilt."""


def service_name(training: K2Training) -> str:
    return f"{training.metadata.name}-workers"


def config_name(training: K2Training) -> str:
    return f"{training.metadata.name}-config"


def worker_account_name(training: K2Training) -> str:
    return f"{training.metadata.name}-worker"


def job_name(training: K2Training, attempt: int) -> str:
    return f"{training.metadata.name}-worker-{attempt}"


def master_addr(training: K2Training, attempt: int) -> str:
    return f"{job_name(training, attempt)}-0.{service_name(training)}.{training.metadata.namespace}.svc"


def headless_service(training: K2Training) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(training, service_name(training), COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before any worker is Ready
            "selector": selector_labels(training, COMPONENT),
            "ports": [
                {
                    "name": PortNames.RENDEZVOUS,
                    "port": Ports.RENDEZVOUS,
                    "targetPort": Ports.RENDEZVOUS,
                    "protocol": "TCP",
                }
            ],
        },
    }


def config_document(training: K2Training) -> dict[str, Any]:
    """The manifest the worker reads with `--config`: apiVersion, kind, name, namespace and spec (no status)."""
    return {
        "apiVersion": training.api_version,
        "kind": training.kind,
        "metadata": {"name": training.metadata.name, "namespace": training.metadata.namespace},
        "spec": training.spec.to_dict(),
    }


def config_map(training: K2Training) -> Manifest:
    text = yaml.safe_dump(config_document(training), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(training, config_name(training), COMPONENT),
        "data": {Files.TRAINING_CONFIG: text},
    }


def rbac(training: K2Training) -> list[Manifest]:
    """The workers may read and patch the status of this K2Training only (rank 0 writes status.progress)."""
    rules = [
        {
            "apiGroups": [training.GROUP],
            "resources": [f"{training.PLURAL}/status"],
            "resourceNames": [training.metadata.name],
            "verbs": ["get", "patch"],
        }
    ]
    return worker_rbac(training, worker_account_name(training), COMPONENT, rules)


def _command(training: K2Training) -> list[str]:
    """The worker's own launcher: with nprocPerNode > 1 it starts the pod's ranks itself (RANK = NODE_RANK x N + i)
    and, unlike torchrun, exits ExitCodes.PREEMPTED when SIGTERM made its ranks checkpoint and stop."""
    spec = training.spec
    command = ["k2", "worker", "train", "--config", f"{Files.CONFIG_DIR}/{Files.TRAINING_CONFIG}", "--json"]
    if spec.nproc_per_node > 1:
        command += ["--nproc-per-node", str(spec.nproc_per_node)]
    return command


def _env(training: K2Training, attempt: int) -> list[dict[str, Any]]:
    spec = training.spec
    index = {"valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
    return [
        {"name": TorchrunEnv.MASTER_ADDR, "value": master_addr(training, attempt)},
        {"name": TorchrunEnv.MASTER_PORT, "value": str(Ports.RENDEZVOUS)},
        {"name": TorchrunEnv.WORLD_SIZE, "value": str(spec.world_size)},
        {"name": TorchrunEnv.NNODES, "value": str(spec.num_nodes)},
        {"name": TorchrunEnv.NPROC_PER_NODE, "value": str(spec.nproc_per_node)},
        {"name": TorchrunEnv.NODE_RANK, **index},
        # One process per pod: its global rank is the node rank (torchrun overrides RANK/LOCAL_RANK otherwise).
        {"name": TorchrunEnv.RANK, **index},
        {"name": TorchrunEnv.LOCAL_RANK, "value": "0"},
        {"name": Env.TRAINING_NAME, "value": training.metadata.name},
        {"name": Env.NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": Env.RESTART_ATTEMPT, "value": str(attempt)},
        {"name": Env.METRICS_PORT, "value": str(Ports.METRICS)},
        {"name": Env.TERMINATION_LOG, "value": Files.TERMINATION_LOG},
    ]


def pod_failure_policy() -> dict[str, Any]:
    """Preemption (the worker's exit code, or a disruption the cluster announced) fails the Job with reason
    PodFailurePolicy instead of counting as a failure: the operator restarts the whole gang, uncounted. A single
    replaced pod (action Ignore) could not rejoin the running gang's process group."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": COMPONENT, "operator": "In", "values": [ExitCodes.PREEMPTED]},
            },
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _checkpoint_volume(training: K2Training) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The claim, or an emptyDir, mounted at mountPath; None when checkpoints go to a URI."""
    ckpt = training.spec.checkpointing
    if ckpt.uri is not None:
        return None
    source: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": ckpt.claim_name}} if ckpt.claim_name else {"emptyDir": {}}
    )
    return {"name": CHECKPOINT_VOLUME, **source}, {"name": CHECKPOINT_VOLUME, "mountPath": ckpt.mount_path}


def _input_claims(training: K2Training) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of the claims spec.model.checkpointUri and spec.data.uri name, mounted read-only; the
    checkpoint claim, when one of them, keeps its one volume (mounted read-write at mountPath as well)."""
    spec = training.spec
    claims = claims_of({"spec.model.checkpointUri": spec.model.checkpoint_uri, "spec.data.uri": spec.data.uri})
    claim_name = spec.checkpointing.claim_name
    return claim_volumes(claims, {claim_name: CHECKPOINT_VOLUME} if claim_name else None)


def job(training: K2Training, attempt: int, preemptions: int = 0) -> Manifest:
    """The gang of attempt `attempt` (0 for the first run, +1 per gang restart or preemption, `preemptions` of
    which were preemptions)."""
    assert 0 <= preemptions <= attempt
    spec = training.spec
    attempt_label = {Labels.ATTEMPT: str(attempt)}
    tmp_volume, tmp_mount = writable_tmp()
    volumes = [{"name": "config", "configMap": {"name": config_name(training)}}, tmp_volume]
    mounts = [{"name": "config", "mountPath": Files.CONFIG_DIR, "readOnly": True}, tmp_mount]
    checkpoint = _checkpoint_volume(training)
    if checkpoint is not None:
        volumes.append(checkpoint[0])
        mounts.append(checkpoint[1])
    input_volumes, input_mounts = _input_claims(training)
    volumes += input_volumes
    mounts += input_mounts
    annotations = {
        **propagated_annotations(training),
        Annotations.CONFIG_HASH: content_hash(config_document(training)),
    }
    container = {
        "name": COMPONENT,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": _command(training),
        "env": _env(training, attempt),
        "ports": [
            {"name": PortNames.RENDEZVOUS, "containerPort": Ports.RENDEZVOUS, "protocol": "TCP"},
            {"name": PortNames.METRICS, "containerPort": Ports.METRICS, "protocol": "TCP"},
        ],
        "resources": resources(
            spec.resources.cpu, spec.resources.memory, spec.resources.gpu_resource_name, spec.gpus_per_node
        ),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        # The worker writes why it stopped here; a crash before it could falls back to the log's tail.
        "terminationMessagePath": Files.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it; the operator restarts whole gangs
        # A preempted rank finishes its step and checkpoints on SIGTERM; Kubernetes' default 30 s is too short for that.
        "terminationGracePeriodSeconds": spec.checkpointing.preemption_grace_seconds,
        "subdomain": service_name(training),
        "serviceAccountName": worker_account_name(training),
        "securityContext": pod_security_context(),
        **scheduling_fields(spec.scheduling),
        "containers": [container],
        "volumes": volumes,
    }
    job_metadata = metadata(training, job_name(training, attempt), COMPONENT, **attempt_label)
    job_metadata["annotations"] = {PREEMPTIONS_ANNOTATION: str(preemptions)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata,
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.num_nodes,
            "parallelism": spec.num_nodes,
            "backoffLimit": 0,  # one failed worker fails the gang; the operator restarts it as a whole
            "podFailurePolicy": pod_failure_policy(),
            "suspend": spec.suspend,
            "template": {
                "metadata": {
                    "labels": {**metadata(training, "", COMPONENT, **attempt_label)["labels"]},
                    "annotations": annotations,
                },
                "spec": pod_spec,
            },
        },
    }


def children(training: K2Training, attempt: int, preemptions: int = 0) -> list[Manifest]:
    """Everything a running K2Training needs, in apply order."""
    return [config_map(training), headless_service(training), *rbac(training), job(training, attempt, preemptions)]
