"""One live setup, start to end: a namespace, a k2-debug checkpoint on a claim, the chart watching that namespace,
a K2Serving of 2 x 2 ranks loading the checkpoint, and the frontend forwarded to 127.0.0.1. The e2e tests and the
live benchmark both run inside it."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveloop.checkpoint import upload
from liveloop.kubectl import Kubectl
from liveloop.observe import Prometheus, ServingSeries
from liveloop.skew import CANDIDATES, Load, expert_loads
from liveloop.system import Chart, Image, Serving, wait_for

# A pod's first start on a loaded 2-core machine (torch import, checkpoint read, gloo rendezvous) takes 30-120 s.
READY_TIMEOUT_S = 480


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A k2-debug checkpoint with fixed random weights."""
    import torch

    from k2_workers.model import K2Config, K2ForCausalLM, save_pretrained

    torch.manual_seed(seed)
    save_pretrained(K2ForCausalLM(K2Config.from_preset("k2-debug")).eval(), directory)
    return directory


@dataclass(frozen=True)
class Live:
    kubectl: Kubectl
    namespace: str
    serving: Serving
    series: ServingSeries
    url: str
    """The frontend, forwarded to 127.0.0.1."""
    second_model_uri: str
    """The same weights at another path: changing spec.model.checkpointUri to it rolls the groups."""
    prompt_loads: dict[str, Load]
    """Skewed prompts and the experts their tokens take (liveloop.skew), from the served checkpoint."""

    def placement(self) -> dict[str, Any]:
        placement: dict[str, Any] = self.serving.placement(self.kubectl)
        return placement

    def rank_pods(self) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={self.serving.name},app.kubernetes.io/component=rank"
        listed = self.kubectl.get("pods", f"--selector={selector}", namespace=self.namespace)
        pods: list[dict[str, Any]] = listed["items"]
        return pods


@contextlib.contextmanager
def live_setup(
    kubectl: Kubectl,
    node_selector: Mapping[str, str],
    prometheus_url: str,
    prometheus_pod_url: str,
    image: Image | None = None,
    **serving_fields: Any,
) -> Iterator[Live]:
    image = image or Image()
    namespace = f"k2-live-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", namespace)
    chart = Chart(f"k2-{namespace}", namespace, image, node_selector, prometheus_url=prometheus_pod_url)
    try:
        with tempfile.TemporaryDirectory(prefix="k2-live-checkpoint-") as scratch:
            checkpoint = write_checkpoint(Path(scratch))
            model_uri = upload(kubectl, namespace, checkpoint, "models", "k2-debug", image, node_selector)
            second_uri = upload(kubectl, namespace, checkpoint, "models", "k2-debug-copy", image, node_selector)
            loads = expert_loads(checkpoint, CANDIDATES)
        chart.install(kubectl)
        serving = Serving(
            "k2-live", namespace, image, checkpoint_uri=model_uri, node_selector=node_selector, **serving_fields
        )
        serving.apply(kubectl)
        wait_for("the serving ready on every rank", lambda: serving.ready(kubectl), READY_TIMEOUT_S, every_s=2)
        series = ServingSeries(Prometheus(prometheus_url), serving.name, namespace)
        with kubectl.port_forward(namespace, serving.frontend_service(), serving.frontend_port) as port:
            yield Live(kubectl, namespace, serving, series, f"http://127.0.0.1:{port}", second_uri, loads)
    finally:
        try:
            chart.uninstall(kubectl)
        finally:
            kubectl.run("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
