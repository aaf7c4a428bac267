"""up / down / is_healthy: start the components in order, wait for each, create the nodes; stop and clean up."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import yaml

from . import api, kubelet, monitoring, network, processes, realnode, storage
from .controlplane import COMPONENTS, command_lines, free_port_set, free_ports, health_urls
from .errors import ClusterError
from .layout import DEFAULT_DIR, TOOLS_BIN, Layout, State
from .nodes import MAX_NODES, NUM_NODES, gpu_node_manifest, node_ready, summarize
from .pki import kubeconfig_for, make_pki


def owner(layout: Layout) -> processes.Owner:
    """Recognises this cluster's component processes (the real node's and containerd's shims included)."""
    programs = (*COMPONENTS, *realnode.REAL_NODE_COMPONENTS, realnode.SHIM, monitoring.PROGRAM)
    return processes.Owner(layout.root, programs)


def components(state: State) -> tuple[str, ...]:
    """The components that `state`'s cluster runs, in start order."""
    if not state.real_node:
        return COMPONENTS
    prometheus = (monitoring.PROGRAM,) if state.prometheus_url else ()  # clusters started before it existed lack it
    return (*COMPONENTS, *realnode.REAL_NODE_COMPONENTS, *prometheus)


def leftovers(layout: Layout) -> list[str]:
    """What the cluster in `layout` left on this machine: processes, and the real node's mounts, cgroups, network."""
    processes_left = [f"process {pid}: {' '.join(processes.cmdline(pid))}" for pid in leftover_pids(layout)]
    return processes_left + realnode.host_leftovers(layout)


def leftover_pids(layout: Layout) -> list[int]:
    """Every live component whose command line names this cluster's directory."""
    return owner(layout).live_pids()


def real_node_holder() -> Path | None:
    """The directory of the live cluster whose real node holds this machine (one per machine). None when it is free, or
    held only by a cluster whose processes are all gone (a killed run): the next `up` with a real node reclaims it."""
    root = network.bridge_owner()
    if root is None or not owner(Layout(root)).live_pids():
        return None
    return root


def _reclaim_the_real_node(layout: Layout, tools: Path) -> None:
    """Stops what a dead cluster's real node left (bridge, mounts, pod sandboxes and cgroups), so that the cluster in
    `layout` can take the machine's real node. The dead cluster's directory is kept, for its logs."""
    root = network.bridge_owner()
    if root is None or root == layout.root or owner(Layout(root)).live_pids():
        return  # free; ours (`_stop` cleans it); or live, which `realnode.check_can_start` refuses by name
    print(
        f"local cluster: the real node of {root} outlived its cluster (a killed run); removing what it left, keeping "
        "the directory",
        file=sys.stderr,
    )
    dead = Layout(root)
    with _locked(dead):
        _stop(dead, remove=False, tools=tools)


def _made_the_bridge(layout: Layout) -> bool:
    try:
        return network.bridge_owner() == layout.root
    except ClusterError:  # a bridge that names no cluster: not ours to remove
        return False


def _lock_path(layout: Layout) -> Path:
    digest = hashlib.sha1(str(layout.root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"k2-cluster-lock-{digest}"


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Serialises concurrent up/down on the same directory (two `make cluster-up` at once)."""
    with _lock_path(layout).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_healthy(root: Path = DEFAULT_DIR) -> bool:
    """True when a cluster started by `up` in `root` runs and its apiserver answers /readyz."""
    layout = Layout(root.resolve())
    state = State.load(layout)
    if state is None or not state.ready or not layout.kubeconfig.is_file():
        return False
    if any(not owner(layout).owns(state.pids.get(name, -1)) for name in components(state)):
        return False
    return api.apiserver_ready(layout, state)


def describe_nodes(layout: Layout, state: State) -> str:
    """One line: how many Ready nodes with how many GPUs each, e.g. `4 Ready x 8 nvidia.com/gpu`."""
    status, body = api.api_request(layout, state, "GET", "/api/v1/nodes")
    if status != 200:
        return f"unknown (HTTP {status})"
    return summarize(body["items"])


def _create_nodes(layout: Layout, state: State, num_nodes: int) -> None:
    for index in range(num_nodes):
        status, body = api.api_request(layout, state, "POST", "/api/v1/nodes", gpu_node_manifest(index))
        if status not in (201, 409):
            raise ClusterError(f"creating node gpu-node-{index} failed with HTTP {status}: {body}")


def _nodes_ready(layout: Layout, state: State, num_nodes: int) -> bool:
    nodes = api.list_nodes(layout, state)
    return nodes is not None and sum(map(node_ready, nodes)) >= num_nodes


def _check_owned(layout: Layout) -> None:
    """Refuses to start in or remove a directory that is neither empty nor a cluster directory."""
    if layout.root.is_dir() and any(layout.root.iterdir()) and not layout.state.exists():
        raise ClusterError(f"{layout.root} is not empty and holds no state.json: refusing to use it")


def _spawn(
    component: str, argv: list[str], layout: Layout, state: State, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    process = processes.spawn(argv, layout.log(component), cwd=layout.root, env=env)
    state.pids[component] = process.pid
    state.save(layout)
    return process


def start_prometheus(layout: Layout, state: State, tools: Path) -> None:
    """Starts the cluster's Prometheus and records its port and pid in state.json; `down` stops it.

    It is reachable from this machine, and from the real node's pods when `state` has the real node.
    """
    port = free_port_set(1)[0]
    files = monitoring.PrometheusFiles.of(layout)
    process = monitoring.start(layout, state.server, files, port, tools, on_gateway=state.real_node)
    state.ports[monitoring.PROGRAM], state.pids[monitoring.PROGRAM] = port, process.pid
    state.save(layout)


def _start(layout: Layout, num_nodes: int, tools: Path, real_node: bool) -> State:
    _check_owned(layout)
    if real_node:
        realnode.check_can_start(tools)  # before the control plane: fail fast, and make nothing ours to clean
    if layout.root.exists():
        shutil.rmtree(layout.root)
    layout.logs.mkdir(parents=True)
    make_pki(layout.pki)
    ports = free_ports()
    state = State(ports=asdict(ports), real_node=real_node)
    state.save(layout)
    layout.kubeconfig.write_text(yaml.safe_dump(kubeconfig_for(state.server, layout.pki, "admin"), sort_keys=False))
    layout.kubeconfig.chmod(0o600)
    argv = command_lines(layout, ports, tools, real_node=real_node)

    def wait(what: str, check: Callable[[], bool], component: str, process: subprocess.Popen[bytes]) -> None:
        processes.wait_for(what, check, component, layout.log(component), process)

    etcd = _spawn("etcd", argv["etcd"], layout, state)
    etcd_health = f"http://127.0.0.1:{ports.etcd_client}/health"
    wait("etcd /health", lambda: '"health":"true"' in api.get(etcd_health)[1], "etcd", etcd)

    apiserver = _spawn("kube-apiserver", argv["kube-apiserver"], layout, state)
    wait("kube-apiserver /readyz", lambda: api.apiserver_ready(layout, state), "kube-apiserver", apiserver)

    started = {name: _spawn(name, argv[name], layout, state) for name in COMPONENTS[2:]}
    for name, url in health_urls(ports).items():
        context = api.unverified_context() if url.startswith("https") else None
        wait(f"{name} {url}", functools.partial(api.healthz_ok, url, context), name, started[name])

    _create_nodes(layout, state, num_nodes)
    wait(f"{num_nodes} Ready nodes", lambda: _nodes_ready(layout, state, num_nodes), "kwok", started["kwok"])
    wait(
        "the default ServiceAccount (controller-manager at work)",
        lambda: api.default_service_account_exists(layout, state),
        "kube-controller-manager",
        started["kube-controller-manager"],
    )
    if real_node:
        realnode.start(layout, state, tools, lambda name, argv, env: _spawn(name, argv, layout, state, env))
        storage.ensure(layout, state, kubelet.NODE_NAME)
        start_prometheus(layout, state, tools)
    state.ready = True
    state.save(layout)
    return state


def up(root: Path = DEFAULT_DIR, num_nodes: int = NUM_NODES, tools: Path = TOOLS_BIN, real_node: bool = False) -> State:
    """Starts a cluster in `root`, or keeps the healthy one already there. On failure everything started is stopped.

    With `real_node` the cluster also runs a kubelet node on this machine (needs root, containerd and runc); a
    healthy cluster without one is then started afresh.
    """
    if not 1 <= num_nodes <= MAX_NODES:
        raise ValueError(f"num_nodes must be between 1 and {MAX_NODES}, got {num_nodes}")
    layout = Layout(root.resolve())
    with _locked(layout):
        if is_healthy(layout.root):
            state = State.load(layout)
            assert state is not None
            if state.real_node:
                realnode.import_worker_image(layout)  # a rebuilt image reaches the running node
                storage.ensure(layout, state, kubelet.NODE_NAME)  # idempotent; a cluster started before it gets it
                if state.prometheus_url is None:  # a cluster started before the local Prometheus existed
                    start_prometheus(layout, state, tools)
            if state.real_node or not real_node:
                return state
        if State.load(layout) is not None:
            print(f"local cluster: {layout.root} holds a stopped or broken cluster; starting afresh", file=sys.stderr)
        _stop(layout, remove=True, tools=tools)
        if real_node:
            _reclaim_the_real_node(layout, tools)
        try:
            return _start(layout, num_nodes, tools, real_node)
        except BaseException:
            with contextlib.suppress(ClusterError):
                _stop(layout, remove=False, tools=tools)  # keep the logs the error message points to
            raise


def _stop(layout: Layout, remove: bool, tools: Path = TOOLS_BIN) -> None:
    state = State.load(layout)
    ours = owner(layout)
    if state is not None and monitoring.PROGRAM in state.pids:
        port = state.ports[monitoring.PROGRAM]
        files = monitoring.PrometheusFiles.of(layout)
        monitoring.stop(state.pids[monitoring.PROGRAM], files, port, on_gateway=state.real_node)
    had_real_node = layout.node.exists() or _made_the_bridge(layout)  # the node's directory may be gone
    if had_real_node:
        realnode.stop(layout, state, tools)
    if state is not None:
        for name in reversed(COMPONENTS):
            if name in state.pids:
                processes.stop_group(state.pids[name], ours, grace_s=10.0)
    for pid in ours.live_pids():  # e.g. state.json was lost
        processes.stop_group(pid, ours, grace_s=5.0)
    left = ours.live_pids()
    if left:
        raise ClusterError(f"processes still running after stop: {left}")
    if had_real_node:
        host_left = realnode.host_leftovers(layout)
        if host_left:
            raise ClusterError("the real node left these behind:\n  " + "\n  ".join(host_left))
    if state is not None and layout.state.exists():
        state.pids, state.ready = {}, False
        state.save(layout)
    if remove and layout.root.exists():
        _check_owned(layout)
        shutil.rmtree(layout.root)


def down(root: Path = DEFAULT_DIR) -> None:
    """Stops every process of the cluster in `root` and removes its directory; a no-op when nothing is there."""
    layout = Layout(root.resolve())
    with _locked(layout):
        try:
            _stop(layout, remove=True)
        finally:
            _lock_path(layout).unlink(missing_ok=True)
