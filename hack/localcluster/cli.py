"""`local_cluster.py up|down|status [--dir DIR] [--nodes N] [--real-node]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cluster import describe_nodes, down, is_healthy, up
from .errors import ClusterError
from .layout import DEFAULT_DIR, Layout, State
from .nodes import NUM_NODES


def _print_up(layout: Layout, num_nodes: int, real_node: bool) -> None:
    started = time.monotonic()
    already = is_healthy(layout.root)
    state = up(layout.root, num_nodes, real_node=real_node)
    verb = "already up" if already else f"up in {time.monotonic() - started:.1f}s"
    print(f"local cluster {verb}: {state.server}")
    print(f"  nodes:      {describe_nodes(layout, state)}")
    print(f"  kubeconfig: {layout.kubeconfig}")
    print(f"  logs:       {layout.logs}/")
    _print_prometheus(state)
    print(f"  try:        .tools/bin/kubectl --kubeconfig {layout.kubeconfig} get nodes")


def _print_prometheus(state: State | None) -> None:
    if state is not None and state.prometheus_url:
        print(f"  prometheus: {state.prometheus_url} (from the real node's pods: {state.prometheus_pod_url})")


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status (1 with a one-paragraph error on failure)."""
    parser = argparse.ArgumentParser(description="A real Kubernetes control plane on loopback, with fake GPU nodes.")
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: .cluster)")
    parser.add_argument("--nodes", type=int, default=NUM_NODES, help=f"number of fake GPU nodes (default: {NUM_NODES})")
    parser.add_argument(
        "--real-node", action="store_true", help="also run a kubelet + containerd node on this machine (needs root)"
    )
    args = parser.parse_args(argv)
    layout = Layout(args.dir.resolve())
    try:
        if args.command == "up":
            _print_up(layout, args.nodes, args.real_node)
        elif args.command == "down":
            down(layout.root)
            print("local cluster down: no process left")
        else:
            healthy = is_healthy(layout.root)
            print("up" if healthy else "down")
            if healthy:
                _print_prometheus(State.load(layout))
            return 0 if healthy else 1
    except (ClusterError, ValueError) as error:
        print(f"local cluster: {error}", file=sys.stderr)
        return 1
    return 0
