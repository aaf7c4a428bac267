"""`make demo`: the README's main job on the local cluster (which `make demo` starts first, real node included).

It installs the chart (operator + EPLB controller) in its own namespace, applies the two examples (a K2Serving of
2 groups x 2 ranks and a K2Training of 2 pods) pinned to the real node, drives skewed traffic through the frontend,
and prints a live summary until the EPLB controller has rebalanced `--rebalances` times: groups ready, per-GPU load
as bars, each rebalance's balancedness and experts/bytes moved, requests ok/failed, and the training's progress.
The cluster stays up for kubectl; `make demo-down` stops it."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HACK = Path(__file__).resolve().parents[1]
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))

from liveloop.checkpoint import upload  # noqa: E402
from liveloop.kubectl import Kubectl  # noqa: E402
from liveloop.observe import Prometheus, ServingSeries, bars  # noqa: E402
from liveloop.session import write_checkpoint  # noqa: E402
from liveloop.skew import CANDIDATES, Phases, expert_loads  # noqa: E402
from liveloop.system import REPO, Chart, Image, wait_for  # noqa: E402
from liveloop.traffic import Tally, Traffic  # noqa: E402
from localcluster.layout import DEFAULT_DIR, Layout, State  # noqa: E402

REAL_NODE = {"type": "real"}
WINDOW_S = 30
# The examples ask one CPU per pod; the real node has this machine's two.
CPU = {"K2Serving": "200m", "K2Training": "300m"}
TRAINING_PHASES = ("Succeeded", "Failed", "Suspended", "Restarting", "Running", "Created")
"""The K2Training conditions, the most telling first."""


def example(name: str, namespace: str, model_uri: str) -> dict[str, Any]:
    """An example manifest, pinned to the real node with a CPU request that fits it; the serving loads `model_uri`
    and has an EPLB that reacts within seconds rather than minutes."""
    body: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    body["metadata"]["namespace"] = namespace
    spec = body["spec"]
    spec["scheduling"] = {"nodeSelector": REAL_NODE}
    spec["resources"]["cpu"] = CPU[body["kind"]]
    if body["kind"] == "K2Serving":
        spec["model"]["checkpointUri"] = model_uri
        spec["eplb"].update(intervalSeconds=5, windowSeconds=WINDOW_S, cooldownSeconds=15)
    return body


def training_line(training: dict[str, Any]) -> str:
    status = training.get("status", {})
    progress = status.get("progress") or {}
    true = {c["type"] for c in status.get("conditions", []) if c.get("status") == "True"}
    phase = next((t for t in TRAINING_PHASES if t in true), "Pending")
    if not progress:
        return f"training {training['metadata']['name']}: {phase}"
    loss = progress.get("loss")
    return (
        f"training {training['metadata']['name']}: {phase}, step {progress.get('step')}/{training['spec']['steps']}"
        + (f", loss {loss:.3f}" if isinstance(loss, float) else "")
    )


def summary(kubectl: Kubectl, namespace: str, series: ServingSeries, traffic: Traffic, moves: list[str]) -> str:
    serving = kubectl.get("k2serving/k2-debug-serve", namespace=namespace).get("status", {})
    training = kubectl.get("k2training/k2-debug-train", namespace=namespace)
    balancedness = series.balancedness(WINDOW_S)
    lines = [
        time.strftime("%H:%M:%S")
        + f"  groups ready {serving.get('readyGroups', 0)}/{serving.get('groups', 0)}, placement generation "
        + f"{serving.get('placementGeneration')}, balancedness "
        + (f"{balancedness:.3f}" if balancedness is not None else "-"),
        "per-GPU load (last 30 s):",
        *("  " + line for line in bars(series.gpu_loads(WINDOW_S))),
        *moves,
        f"requests: {Tally.of(traffic.outcomes())}",
        training_line(training),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", default="k2-demo")
    parser.add_argument("--rebalances", type=int, default=3, help="stop the traffic after this many")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop the traffic after this long anyway")
    args = parser.parse_args(argv)

    layout = Layout(DEFAULT_DIR.resolve())
    state = State.load(layout)
    if state is None or not state.prometheus_url or not state.prometheus_pod_url:
        print("no local cluster with a real node and Prometheus: run `make cluster-up` (or `make demo`)")
        return 2
    tools = REPO / ".tools" / "bin"
    kubectl = Kubectl(layout.root / "kubeconfig", tools / "kubectl", tools / "helm")
    namespace = args.namespace
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, namespace)
    with tempfile.TemporaryDirectory(prefix="k2-demo-checkpoint-") as scratch:
        checkpoint = write_checkpoint(Path(scratch))
        model_uri = upload(kubectl, namespace, checkpoint, "models", "k2-debug", Image(), REAL_NODE)
        phases = Phases(expert_loads(checkpoint, CANDIDATES))
    print(f"wrote a k2-debug checkpoint to {model_uri} (a PersistentVolumeClaim of the k2-local StorageClass)")
    print(f"installing the chart in {namespace} (operator + EPLB controller, image {Image().ref})")
    Chart("k2", namespace, Image(), REAL_NODE, prometheus_url=state.prometheus_pod_url).install(kubectl)
    for name in ("k2serving-debug.yaml", "k2training-debug.yaml"):
        kubectl.apply(example(name, namespace, model_uri), namespace)
        print(f"applied examples/{name}")
    series = ServingSeries(Prometheus(state.prometheus_url), "k2-debug-serve", namespace)

    def serving_ready() -> bool:
        status = kubectl.get("k2serving/k2-debug-serve", namespace=namespace).get("status", {})
        return bool(status.get("readyGroups") == 2 and status.get("placementGeneration"))

    print("waiting for the 4 serving ranks and the frontend (a first start takes a minute or two)")
    wait_for("the serving ready", serving_ready, 600, every_s=2)
    moves: list[str] = []
    placement = kubectl.get("expertplacement/k2-debug-serve", namespace=namespace)
    phase = [phases.next(placement)]
    generation, started = int(placement["spec"]["generation"]), time.monotonic()
    with kubectl.port_forward(namespace, "service/k2-debug-serve", 8000) as port:
        traffic = Traffic(f"http://127.0.0.1:{port}", lambda: phase[0], max_seconds=args.max_seconds).start()
        try:
            while len(moves) < args.rebalances and time.monotonic() - started < args.max_seconds:
                time.sleep(5)
                placement = kubectl.get("expertplacement/k2-debug-serve", namespace=namespace)
                status = placement.get("status", {})
                if int(placement["spec"]["generation"]) > generation and status.get("appliedGeneration") == int(
                    placement["spec"]["generation"]
                ):
                    generation = int(placement["spec"]["generation"])
                    moves.append(
                        f"rebalance {len(moves) + 1}: generation {generation}, predicted balancedness "
                        f"{status.get('predictedBalancedness', 0):.3f}, {status.get('movedExperts', 0)} experts "
                        f"({status.get('movedBytes', 0)} bytes) moved, applied by {status.get('appliedRanks')} ranks"
                    )
                    if len(moves) < args.rebalances:  # shift the skew to what this placement serves worst
                        phase[0] = phases.next(placement)
                print(summary(kubectl, namespace, series, traffic, moves) + "\n", flush=True)
        finally:
            outcomes = traffic.stop()
    bytes_moved = series.weight_bytes()
    print(f"done: {Tally.of(outcomes)}")
    print(f"expert bytes the ranks took in since they started (their first load from storage included): {bytes_moved}")
    kubeconfig = layout.root / "kubeconfig"
    print(f"the cluster stays up: .tools/bin/kubectl --kubeconfig {kubeconfig} -n {namespace} get k2s,k2t,xp")
    print("`make demo-down` stops it")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
