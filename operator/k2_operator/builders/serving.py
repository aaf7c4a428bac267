"""Children of a K2Serving: model ConfigMap, per group a headless Service and a StatefulSet of expert-parallel ranks,
a frontend Deployment and Service, the ranks' RBAC, and (created once) the ExpertPlacement.

Rolling updates: every group's StatefulSet uses `updateStrategy: OnDelete`, so a new pod template (image, model,
resources) is recorded at once but replaces no pod by itself. The operator then restarts whole groups, lowest index
first, only while fewer than `spec.rollout.maxUnavailableGroups` groups are unavailable
(`k2_operator.status.serving.groups_to_restart`): an expert-parallel group is a gang, so restarting its ranks one by
one (RollingUpdate) would keep it broken longer and mix two model versions inside one group. The other groups keep
serving throughout.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from k2_api import K2Serving
from k2_api.contract import (
    Annotations,
    Env,
    Files,
    GrpcServices,
    HttpPaths,
    Labels,
    PortNames,
    Ports,
    TorchrunEnv,
    moe_shape,
)
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
from k2_operator.builders.placement import active_config_name, placement_name

RANK_COMPONENT = "rank"
FRONTEND_COMPONENT = "frontend"
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


def group_name(serving: K2Serving, group: int) -> str:
    return f"{serving.metadata.name}-g{group}"


def model_config_name(serving: K2Serving) -> str:
    return f"{serving.metadata.name}-model"


def frontend_name(serving: K2Serving) -> str:
    return f"{serving.metadata.name}-frontend"


def frontend_service_name(serving: K2Serving) -> str:
    name = serving.metadata.name
    assert name is not None
    return name


def rank_account_name(serving: K2Serving) -> str:
    return f"{serving.metadata.name}-rank"


def endpoint(serving: K2Serving) -> str:
    return f"http://{frontend_service_name(serving)}.{serving.metadata.namespace}.svc:{serving.spec.frontend.port}"


def rank_selector(serving: K2Serving) -> str:
    """Label selector of every rank pod of the serving (status.selector, used by the scale subresource and EPLB)."""
    labels = selector_labels(serving, RANK_COMPONENT)
    return ",".join(f"{k}={v}" for k, v in labels.items())


def rank_pod_names(serving: K2Serving) -> list[str]:
    return [
        f"{group_name(serving, g)}-{r}" for g in range(serving.spec.groups) for r in range(serving.spec.ranks_per_group)
    ]


def model_document(serving: K2Serving) -> dict[str, Any]:
    """The resolved model the ranks load: the spec's model plus its MoE shape and the slot layout."""
    shape = moe_shape(serving.spec.model)
    return {
        **serving.spec.model.to_dict(),
        "numHiddenLayers": shape.num_hidden_layers,
        "firstKDenseReplace": shape.first_k_dense_replace,
        "numMoeLayers": shape.num_moe_layers,
        "numExperts": shape.n_routed_experts,
        "numExpertsPerToken": shape.num_experts_per_tok,
        "ranksPerGroup": serving.spec.ranks_per_group,
        "slotsPerRank": serving.spec.slots_per_rank(shape.n_routed_experts),
    }


def config_document(serving: K2Serving) -> dict[str, Any]:
    return {
        "apiVersion": serving.api_version,
        "kind": serving.kind,
        "metadata": {"name": serving.metadata.name, "namespace": serving.metadata.namespace},
        "spec": serving.spec.to_dict(),
    }


def model_config_map(serving: K2Serving) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(serving, model_config_name(serving), RANK_COMPONENT),
        "data": {
            Files.SERVING_CONFIG: yaml.safe_dump(config_document(serving), sort_keys=False),
            Files.MODEL: json.dumps(model_document(serving), indent=2, sort_keys=True),
        },
    }


def group_service(serving: K2Serving, group: int) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(serving, group_name(serving, group), RANK_COMPONENT, **{Labels.GROUP: str(group)}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(serving, RANK_COMPONENT, **{Labels.GROUP: str(group)}),
            "ports": [
                {
                    "name": PortNames.RENDEZVOUS,
                    "port": Ports.RENDEZVOUS,
                    "targetPort": Ports.RENDEZVOUS,
                    "protocol": "TCP",
                },
                {"name": PortNames.HTTP, "port": Ports.RANK_HTTP, "targetPort": Ports.RANK_HTTP, "protocol": "TCP"},
                {"name": PortNames.GRPC, "port": Ports.GRPC, "targetPort": Ports.GRPC, "protocol": "TCP"},
            ],
        },
    }


def rank_template_hash(serving: K2Serving) -> str:
    """What forces a group restart when it changes: image, model and the per-rank shape and resources."""
    spec = serving.spec
    return content_hash(
        {
            "image": spec.image,
            "model": spec.model.to_dict(),
            "ranksPerGroup": spec.ranks_per_group,
            "gpusPerRank": spec.gpus_per_rank,
            "redundantSlotsPerRank": spec.redundant_slots_per_rank,
            "resources": spec.resources.to_dict(),
            "scheduling": spec.scheduling.to_dict(),
        }
    )


def _model_claims(serving: K2Serving) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of the claim spec.model.checkpointUri names, if any (mounted read-only)."""
    return claim_volumes(claims_of({"spec.model.checkpointUri": serving.spec.model.checkpoint_uri}))


def _rank_container(serving: K2Serving, group: int) -> dict[str, Any]:
    spec = serving.spec
    first_rank = f"{group_name(serving, group)}-0.{group_name(serving, group)}.{serving.metadata.namespace}.svc"
    _, tmp_mount = writable_tmp()
    return {
        "name": RANK_COMPONENT,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [
            "k2",
            "worker",
            "serve",
            "--config",
            f"{Files.CONFIG_DIR}/{Files.SERVING_CONFIG}",
            "--placement",
            f"{Files.PLACEMENT_DIR}/{Files.PLACEMENT}",
            "--grpc-port",
            str(Ports.GRPC),
        ],
        "env": [
            {"name": Env.SERVING_NAME, "value": serving.metadata.name},
            {"name": Env.NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": Env.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": Env.GROUP, "value": str(group)},
            {"name": Env.PLACEMENT_NAME, "value": placement_name(serving)},
            {"name": TorchrunEnv.RANK, "valueFrom": {"fieldRef": {"fieldPath": POD_INDEX}}},
            {"name": TorchrunEnv.WORLD_SIZE, "value": str(spec.ranks_per_group)},
            {"name": TorchrunEnv.MASTER_ADDR, "value": first_rank},
            {"name": TorchrunEnv.MASTER_PORT, "value": str(Ports.RENDEZVOUS)},
        ],
        "ports": [
            {"name": PortNames.RENDEZVOUS, "containerPort": Ports.RENDEZVOUS, "protocol": "TCP"},
            {"name": PortNames.HTTP, "containerPort": Ports.RANK_HTTP, "protocol": "TCP"},
            {"name": PortNames.GRPC, "containerPort": Ports.GRPC, "protocol": "TCP"},
            {"name": PortNames.METRICS, "containerPort": Ports.METRICS, "protocol": "TCP"},
        ],
        # Kubernetes' own gRPC probe asks grpc.health.v1 for the generation service: SERVING once the rank serves
        # (every rank sets it, rank 0 also serves generation), NOT_SERVING while it cannot or drains.
        "readinessProbe": {"grpc": {"port": Ports.GRPC, "service": GrpcServices.GENERATION}, "periodSeconds": 5},
        "resources": resources(
            spec.resources.cpu, spec.resources.memory, spec.resources.gpu_resource_name, spec.gpus_per_rank
        ),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "config", "mountPath": Files.CONFIG_DIR, "readOnly": True},
            {"name": "placement", "mountPath": Files.PLACEMENT_DIR, "readOnly": True},
            tmp_mount,
            *_model_claims(serving)[1],
        ],
    }


def group_stateful_set(serving: K2Serving, group: int) -> Manifest:
    spec = serving.spec
    group_label = {Labels.GROUP: str(group)}
    tmp_volume, _ = writable_tmp()
    template_hash = rank_template_hash(serving)
    pod_labels = metadata(serving, "", RANK_COMPONENT, **group_label)["labels"]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(serving, group_name(serving, group), RANK_COMPONENT, **group_label),
        "spec": {
            "serviceName": group_name(serving, group),
            "replicas": 0 if spec.suspend else spec.ranks_per_group,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": selector_labels(serving, RANK_COMPONENT, **group_label)},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {**propagated_annotations(serving), Annotations.TEMPLATE_HASH: template_hash},
                },
                "spec": {
                    "serviceAccountName": rank_account_name(serving),
                    "securityContext": pod_security_context(),
                    **scheduling_fields(spec.scheduling),
                    "containers": [_rank_container(serving, group)],
                    "volumes": [
                        {"name": "config", "configMap": {"name": model_config_name(serving)}},
                        {
                            "name": "placement",
                            "configMap": {"name": active_config_name(placement_name(serving)), "optional": True},
                        },
                        tmp_volume,
                        *_model_claims(serving)[0],
                    ],
                },
            },
        },
    }


def frontend_deployment(serving: K2Serving) -> Manifest:
    spec = serving.spec
    groups = ",".join(
        f"http://{group_name(serving, g)}-0.{group_name(serving, g)}.{serving.metadata.namespace}.svc:{Ports.RANK_HTTP}"
        for g in range(spec.groups)
    )
    tmp_volume, tmp_mount = writable_tmp()
    labels = selector_labels(serving, FRONTEND_COMPONENT)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(serving, frontend_name(serving), FRONTEND_COMPONENT),
        "spec": {
            "replicas": 0 if spec.suspend else spec.frontend.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": metadata(serving, "", FRONTEND_COMPONENT)["labels"]},
                "spec": {
                    "securityContext": pod_security_context(),
                    "automountServiceAccountToken": False,
                    **scheduling_fields(spec.scheduling),
                    "containers": [
                        {
                            "name": FRONTEND_COMPONENT,
                            "image": spec.image,
                            "imagePullPolicy": spec.image_pull_policy,
                            "command": [
                                "k2",
                                "worker",
                                "serve",
                                "--frontend",
                                "--port",
                                str(spec.frontend.port),
                                "--grpc-port",
                                str(spec.frontend.grpc_port),
                            ],
                            "env": [{"name": Env.GROUP_ENDPOINTS, "value": groups}],
                            "ports": [
                                {"name": PortNames.HTTP, "containerPort": spec.frontend.port, "protocol": "TCP"},
                                {"name": PortNames.GRPC, "containerPort": spec.frontend.grpc_port, "protocol": "TCP"},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": HttpPaths.HEALTHZ, "port": PortNames.HTTP},
                                "periodSeconds": 5,
                            },
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                            "securityContext": container_security_context(),
                            "volumeMounts": [tmp_mount],
                        }
                    ],
                    "volumes": [tmp_volume],
                },
            },
        },
    }


def frontend_service(serving: K2Serving) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(serving, frontend_service_name(serving), FRONTEND_COMPONENT),
        "spec": {
            "type": serving.spec.frontend.service_type,
            "selector": selector_labels(serving, FRONTEND_COMPONENT),
            "ports": [
                {
                    "name": PortNames.HTTP,
                    "port": serving.spec.frontend.port,
                    "targetPort": PortNames.HTTP,
                    "protocol": "TCP",
                },
                {
                    "name": PortNames.GRPC,
                    "port": serving.spec.frontend.grpc_port,
                    "targetPort": PortNames.GRPC,
                    "protocol": "TCP",
                },
            ],
        },
    }


def rbac(serving: K2Serving) -> list[Manifest]:
    """Ranks may read the placement and annotate their own Pod with the generation they applied, nothing else."""
    rules = [
        {
            "apiGroups": [serving.GROUP],
            "resources": ["expertplacements"],
            "resourceNames": [placement_name(serving)],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["pods"], "resourceNames": rank_pod_names(serving), "verbs": ["get", "patch"]},
    ]
    return worker_rbac(serving, rank_account_name(serving), RANK_COMPONENT, rules)


def children(serving: K2Serving) -> list[Manifest]:
    """Everything the serving needs except the ExpertPlacement (created once, then owned by EPLB), in apply order."""
    groups = range(serving.spec.groups)
    return [
        model_config_map(serving),
        *rbac(serving),
        *(group_service(serving, g) for g in groups),
        *(group_stateful_set(serving, g) for g in groups),
        frontend_deployment(serving),
        frontend_service(serving),
    ]
