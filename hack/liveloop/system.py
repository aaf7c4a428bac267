"""The system under test on a cluster: the chart (operator + EPLB controller) and one K2Serving, both pinned to
chosen nodes, and what their status says."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from liveloop.kubectl import Kubectl, KubectlError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2-operator"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    """Polls `probe` until it returns something other than None (or False); TimeoutError naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


@dataclass(frozen=True)
class Image:
    repository: str = "docker.io/k2-operator/worker"
    tag: str = "dev"
    pull_policy: str = "Never"  # the local cluster imports the image; kind loads it (`kind load`)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True)
class Chart:
    """One release of charts/k2-operator that watches one namespace, so that it leaves every other one alone."""

    release: str
    namespace: str
    image: Image = Image()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    prometheus_url: str | None = None
    eplb_interval_s: int = 5

    def values(self) -> list[str]:
        sets = {
            "image.repository": self.image.repository,
            "image.tag": self.image.tag,
            "image.pullPolicy": self.image.pull_policy,
            "watchNamespaces[0]": self.namespace,
            **{f"nodeSelector.{key}": value for key, value in self.node_selector.items()},
        }
        if self.prometheus_url:
            sets["eplb.prometheusUrl"] = self.prometheus_url
            sets["eplb.allowedPrometheusUrls[0]"] = self.prometheus_url
        strings = [arg for key, value in sets.items() for arg in ("--set-string", f"{key}={value}")]
        return [*strings, "--set", f"eplb.interval={self.eplb_interval_s}"]

    def install(self, kubectl: Kubectl) -> None:
        kubectl.helm(
            "upgrade",
            "--install",
            self.release,
            str(CHART),
            f"--namespace={self.namespace}",
            *self.values(),
            "--wait",
            "--timeout=300s",
        )

    def uninstall(self, kubectl: Kubectl) -> None:
        kubectl.helm(
            "uninstall", self.release, f"--namespace={self.namespace}", "--ignore-not-found", "--wait", "--timeout=120s"
        )


@dataclass(frozen=True)
class Serving:
    """A K2Serving of the k2-debug preset: `groups` x `ranks` ranks, EPLB on, every pod on `node_selector`."""

    name: str
    namespace: str
    image: Image = Image()
    groups: int = 2
    ranks: int = 2
    checkpoint_uri: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    cpu: str = "200m"
    memory: str = "2Gi"
    eplb_interval_s: int = 5
    eplb_window_s: int = 20
    eplb_cooldown_s: int = 10
    min_improvement: float = 0.02
    frontend_port: int = 8000

    def manifest(self) -> dict[str, Any]:
        model: dict[str, Any] = {"preset": "k2-debug", "dtype": "fp32"}
        if self.checkpoint_uri:
            model["checkpointUri"] = self.checkpoint_uri
        spec: dict[str, Any] = {
            "model": model,
            "image": self.image.ref,
            "groups": self.groups,
            "ranksPerGroup": self.ranks,
            "gpusPerRank": 1,
            "redundantSlotsPerRank": 1,
            "resources": {"cpu": self.cpu, "memory": self.memory},
            "frontend": {"replicas": 1, "port": self.frontend_port},
            "eplb": {
                "enabled": True,
                "intervalSeconds": self.eplb_interval_s,
                "windowSeconds": self.eplb_window_s,
                "minImprovement": self.min_improvement,
                "maxMovesFraction": 0.16,  # 5 copies of k2-debug's 3 layers x 10 slots: a shock takes rounds
                "cooldownSeconds": self.eplb_cooldown_s,
            },
            "rollout": {"maxUnavailableGroups": 1},
        }
        if self.node_selector:
            spec["scheduling"] = {"nodeSelector": dict(self.node_selector)}
        return {
            "apiVersion": "k2.ai/v1alpha1",
            "kind": "K2Serving",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        }

    def apply(self, kubectl: Kubectl) -> None:
        kubectl.apply(self.manifest(), self.namespace)

    def status(self, kubectl: Kubectl) -> dict[str, Any]:
        status: dict[str, Any] = kubectl.get(f"k2serving/{self.name}", namespace=self.namespace).get("status", {})
        return status

    def placement(self, kubectl: Kubectl) -> dict[str, Any]:
        placement: dict[str, Any] = kubectl.get(f"expertplacement/{self.name}", namespace=self.namespace)
        return placement

    def ready(self, kubectl: Kubectl) -> bool:
        """Every group ready, the frontend ready and the placement in force on every rank (False while any of them
        does not exist yet)."""
        try:
            status = self.status(kubectl)
            placement = self.placement(kubectl).get("status", {})
            frontend = kubectl.get(f"deployment/{self.name}-frontend", namespace=self.namespace).get("status", {})
        except KubectlError:
            return False
        return (
            status.get("readyGroups") == self.groups
            and status.get("readyRanks") == self.groups * self.ranks
            and int(frontend.get("readyReplicas", 0) or 0) >= 1
            and placement.get("appliedRanks") == self.groups * self.ranks
        )

    def frontend_service(self) -> str:
        return f"service/{self.name}"
