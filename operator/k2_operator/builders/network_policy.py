"""Ingress NetworkPolicies of a K2Serving (`spec.networkPolicy.enabled`): one per group, one for the frontend.

Only ingress is restricted; egress stays open (ranks call the API server, the frontend calls the ranks). Per group:
- rendezvous and rank HTTP from the group's own ranks (torch.distributed, rank 0's broadcasts);
- rank HTTP and gRPC also from the serving's frontend pods (generation requests go to each group's rank 0);
- metrics from any pod of the monitoring namespaces (`--monitoring-namespace`: Prometheus, a directly scraping
  EPLB controller), selected by the `kubernetes.io/metadata.name` label the API server puts on every namespace.
The frontend's ports (spec.frontend.port and grpcPort) admit the serving's namespace for a ClusterIP frontend,
anyone for NodePort or LoadBalancer (clients outside the cluster). Whether any of this is enforced depends on the
CNI; kubelet probes come from the node, which CNIs that enforce policies admit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from k2_api import K2Serving
from k2_api.contract import Labels, Ports
from k2_api.serving import ServiceType
from k2_operator.builders.common import Manifest, metadata, selector_labels
from k2_operator.builders.serving import FRONTEND_COMPONENT, RANK_COMPONENT, frontend_name, group_name

API_VERSION = "networking.k8s.io/v1"
KIND = "NetworkPolicy"
MONITORING_NAMESPACE = "monitoring"
"""Default of the operator's --monitoring-namespace."""
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"port": port, "protocol": "TCP"} for port in ports]


def pods(labels: dict[str, str]) -> dict[str, Any]:
    """A peer: the pods with `labels` in the policy's own namespace."""
    return {"podSelector": {"matchLabels": dict(labels)}}  # a copy: no YAML aliases, no shared mutation


def namespaces(names: Sequence[str]) -> dict[str, Any]:
    """A peer: every pod of the namespaces `names`."""
    expression = {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": sorted(set(names))}
    return {"namespaceSelector": {"matchExpressions": [expression]}}


def group_network_policy(serving: K2Serving, group: int, monitoring_namespaces: Sequence[str]) -> Manifest:
    group_label = {Labels.GROUP: str(group)}
    ranks = selector_labels(serving, RANK_COMPONENT, **group_label)
    ingress = [
        {"from": [pods(ranks)], "ports": tcp(Ports.RENDEZVOUS, Ports.RANK_HTTP)},
        {"from": [pods(selector_labels(serving, FRONTEND_COMPONENT))], "ports": tcp(Ports.RANK_HTTP, Ports.GRPC)},
    ]
    if monitoring_namespaces:  # none: the metrics port admits no one
        ingress.append({"from": [namespaces(monitoring_namespaces)], "ports": tcp(Ports.METRICS)})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata(serving, group_name(serving, group), RANK_COMPONENT, **group_label),
        "spec": {"podSelector": pods(ranks)["podSelector"], "policyTypes": ["Ingress"], "ingress": ingress},
    }


def frontend_network_policy(serving: K2Serving) -> Manifest:
    frontend = serving.spec.frontend
    rule: dict[str, Any] = {"ports": tcp(frontend.port, frontend.grpc_port)}
    if frontend.service_type == ServiceType.CLUSTER_IP:
        rule["from"] = [{"podSelector": {}}]  # every pod of the serving's namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata(serving, frontend_name(serving), FRONTEND_COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(serving, FRONTEND_COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


def network_policies(serving: K2Serving, monitoring_namespaces: Sequence[str]) -> list[Manifest]:
    """The serving's NetworkPolicies; none when `spec.networkPolicy.enabled` is false (the reconcile deletes them)."""
    if not serving.spec.network_policy.enabled:
        return []
    groups = range(serving.spec.groups)
    return [
        *(group_network_policy(serving, g, monitoring_namespaces) for g in groups),
        frontend_network_policy(serving),
    ]
