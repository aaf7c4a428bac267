"""A real Kubernetes control plane on loopback, for tests and local runs: no Docker, no kubelet.

`up` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (binaries from `.tools/bin`, built
by `make tools`) as background processes, each in its own process group, and creates fake GPU nodes that kwok keeps
Ready. `down` stops them and removes the state directory. Everything lives in one directory (default `.cluster/`):

    pki/                CA, apiserver serving cert, admin client cert (O=system:masters), service-account key pair,
                        front-proxy CA and client cert (aggregation layer)
    kubeconfig          admin kubeconfig (server https://127.0.0.1:PORT, certificates embedded)
    etcd/               etcd data
    logs/NAME.log       one log per component
    state.json          ports and process ids

Usage: local_cluster.py up|down|status [--dir DIR] [--nodes N]. `up` is idempotent (a healthy cluster is kept) and
`down` with nothing running is a no-op. The test fixture in tests/conftest.py imports this file by path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".cluster"
TOOLS_BIN = ROOT / ".tools" / "bin"
STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"

# Address plan. None of these addresses is ever contacted: only 127.0.0.1 carries traffic.
SERVICE_CIDR = "10.96.0.0/16"  # ClusterIPs allocated by the apiserver
POD_CIDR = "10.244.0.0/16"  # kwok's fallback pool; node i owns 10.244.i.0/24
NODE_IP = "10.250.0.{}"  # fake InternalIP of node i (1-based host part)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

NUM_NODES = 4
MAX_NODES = 100  # node i owns 10.244.i.0/24 and 10.250.0.(i+1); zones are lettered
GPUS_PER_NODE = 8
NODES_PER_RACK = 2
RACKS_PER_ZONE = 2
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
START_TIMEOUT_S = 180.0


class ClusterError(RuntimeError):
    """A component failed to start or the cluster is not usable; the message names the log to read."""


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: node manifests, command lines, kubeconfig.


def gpu_node_manifest(index: int) -> dict[str, Any]:
    """The Node object of fake GPU node `index`: 8 GPUs, a realistic host, topology labels, no taint."""
    name = f"gpu-node-{index}"
    rack = index // NODES_PER_RACK
    zone = "zone-" + "abcdefghijklmnopqrstuvwxyz"[rack // RACKS_PER_ZONE]
    resources = {
        "cpu": "96",
        "memory": "1Ti",
        "ephemeral-storage": "2Ti",
        "pods": "110",
        "nvidia.com/gpu": str(GPUS_PER_NODE),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "gpu-8x-h100",
                "topology.kubernetes.io/region": "local",
                "topology.kubernetes.io/zone": zone,
                "k2.ai/rack": f"rack-{rack}",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(GPUS_PER_NODE),
                "type": "kwok",
            },
        },
        "spec": {
            "podCIDR": f"10.244.{index}.0/24",
            "podCIDRs": [f"10.244.{index}.0/24"],
            "providerID": f"kwok://{name}",
        },
        "status": {
            "allocatable": resources,
            "capacity": resources,
            "addresses": [
                {"type": "InternalIP", "address": NODE_IP.format(index + 1)},
                {"type": "Hostname", "address": name},
            ],
        },
    }


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class Layout:
    """Where every file of one cluster lives."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"


def command_lines(layout: Layout, ports: Ports, tools: Path) -> dict[str, list[str]]:
    """The argv of every component, in start order."""
    pki, kubeconfig = layout.pki, str(layout.kubeconfig)
    etcd_url = f"http://127.0.0.1:{ports.etcd_client}"
    peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
    client_auth = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}"]
    client_auth += [f"--authorization-kubeconfig={kubeconfig}"]
    return {
        "etcd": [
            str(tools / "etcd"),
            "--name=k2-local",
            f"--data-dir={layout.root / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=k2-local={peer_url}",
            "--unsafe-no-fsync=true",  # a throwaway test store: durability is not worth the disk time
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            str(tools / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--authorization-mode=Node,RBAC",
            # Added to the default set, which already holds ServiceAccount, NamespaceLifecycle, ResourceQuota, ...
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            # Privileged pods pass the apiserver, so only PodSecurity admission can reject them.
            "--allow-privileged=true",
            # The advertise address is loopback: never publish it as the endpoint of Service `kubernetes`.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--event-ttl=1h",
        ],
        "kube-controller-manager": [
            str(tools / "kube-controller-manager"),
            *client_auth,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controller_manager}",
            "--controllers=*",
            # These two enable the service-account token and root-CA publisher controllers.
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=false",
        ],
        "kube-scheduler": [
            str(tools / "kube-scheduler"),
            *client_auth,
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.scheduler}",
        ],
        "kwok": [
            str(tools / "kwok"),
            f"--kubeconfig={kubeconfig}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={'='.join(FAKE_NODE_ANNOTATION)}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP.format(254)}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports.kwok}",
        ],
    }


def kubeconfig_document(server: str, ca_pem: str, cert_pem: str, key_pem: str) -> dict[str, Any]:
    """An admin kubeconfig with the CA and client certificate embedded (base64), so it can be copied anywhere."""
    import base64

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k2-local", "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [
            {
                "name": "k2-admin",
                "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
            }
        ],
        "contexts": [{"name": "k2-local", "context": {"cluster": "k2-local", "user": "k2-admin"}}],
        "current-context": "k2-local",
    }


# ---------------------------------------------------------------------------------------------------------------
# State on disk.


@dataclass
class State:
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    ready: bool = False

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def save(self, layout: Layout) -> None:
        tmp = layout.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(layout.state)

    @classmethod
    def load(cls, layout: Layout) -> State | None:
        try:
            data = json.loads(layout.state.read_text())
        except (OSError, ValueError):
            return None
        return cls(ports=data["ports"], pids=data.get("pids", {}), ready=bool(data.get("ready")))


# ---------------------------------------------------------------------------------------------------------------
# Certificates (openssl CLI: nothing to install).


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("the openssl command is missing (Debian package openssl)")
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _ca(pki: Path, name: str, subject: str) -> None:
    """Writes a self-signed CA as NAME.key and NAME.crt."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "3650", "-sha256", "-subj", subject,
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=pki)  # fmt: skip


def _signed_cert(pki: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """Writes NAME.key and NAME.crt, signed by CA.crt."""
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", subject,
             "-out", f"{name}.csr", cwd=pki)  # fmt: skip
    (pki / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", f"0x{os.urandom(8).hex()}", "-days", "3650", "-sha256",
             "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)  # fmt: skip


def make_pki(pki: Path) -> None:
    """A fresh CA, the apiserver serving cert (SANs 127.0.0.1/localhost), an admin client cert and the SA keys."""
    pki.mkdir(parents=True, exist_ok=True)
    _ca(pki, "ca", "/CN=k2-local-ca")
    _ca(pki, "front-proxy-ca", "/CN=k2-local-front-proxy-ca")
    sans = [
        "IP:127.0.0.1",
        "DNS:localhost",
        "IP:10.96.0.1",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
    ]
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    _signed_cert(pki, "apiserver", "/CN=kube-apiserver",
                 common + "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(sans) + "\n")  # fmt: skip
    _signed_cert(pki, "admin", "/O=system:masters/CN=k2-admin", common + "extendedKeyUsage=clientAuth\n")
    # The aggregation layer's client identity; its CA also lets the controllers read the request-header settings.
    _signed_cert(pki, "front-proxy-client", "/CN=front-proxy-client", common + "extendedKeyUsage=clientAuth\n",
                 ca="front-proxy-ca")  # fmt: skip
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


# ---------------------------------------------------------------------------------------------------------------
# Talking to the components (loopback only).


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports() -> Ports:
    ports: set[int] = set()
    while len(ports) < 6:
        ports.add(_free_port())
    return Ports(*sorted(ports))


def _admin_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def _unverified_context() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve /healthz with a self-signed in-memory certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 3.0) -> tuple[int, str]:
    assert url.startswith(("http://127.0.0.1:", "https://127.0.0.1:")), url
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode(errors="replace")
    except (OSError, ValueError):
        return 0, ""


def api_request(layout: Layout, state: State, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One admin request to the apiserver; returns (HTTP status, decoded JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(state.server + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, context=_admin_context(layout.pki), timeout=10) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as error:
        status, raw = int(error.code), error.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def _healthz_ok(url: str, context: ssl.SSLContext | None) -> bool:
    return _get(url, context)[0] == 200


def apiserver_ready(layout: Layout, state: State) -> bool:
    return _get(state.server + "/readyz", _admin_context(layout.pki))[0] == 200


# ---------------------------------------------------------------------------------------------------------------
# Processes.


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_ours(pid: int, layout: Layout) -> bool:
    """True when `pid` is a component (etcd, kube-*, kwok) whose command line names this cluster's directory.

    Guards against pid reuse, and never matches other processes that mention the directory (a waiting `up`, pytest).
    """
    argv = _cmdline(pid).split(" ")
    return Path(argv[0]).name in COMPONENTS and f"{layout.root}/" in " ".join(argv[1:])


def _reap(pid: int) -> None:
    # When our own process started the component (the pytest fixture), collect the zombie.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def leftover_pids(layout: Layout) -> list[int]:
    """Every live component whose command line names this cluster's directory (`pgrep -f DIR`, filtered)."""
    result = subprocess.run(["pgrep", "-f", str(layout.root)], capture_output=True, text=True, check=False)
    return [pid for pid in map(int, result.stdout.split()) if _is_ours(pid, layout)]


def _stop_group(pid: int, layout: Layout, grace_s: float) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL whatever is left after `grace_s`."""
    if not _is_ours(pid, layout):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not _is_ours(pid, layout):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    time.sleep(0.1)
    _reap(pid)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for(
    what: str, check: Callable[[], bool], component: str, process: subprocess.Popen[bytes] | None, layout: Layout
) -> None:
    """Polls `check` until true; fails with the component's log when it exits or the time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if check():
            return
        log = layout.log(component)
        if process is not None and process.poll() is not None:
            raise ClusterError(
                f"{component} exited with code {process.returncode} while waiting for {what}; "
                f"log: {log}\n--- last lines of {log} ---\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {START_TIMEOUT_S:.0f}s waiting for {what}; "
                f"log: {log}\n--- last lines of {log} ---\n{_log_tail(log)}"
            )
        time.sleep(0.25)


def _spawn(component: str, argv: list[str], layout: Layout, state: State) -> subprocess.Popen[bytes]:
    if not Path(argv[0]).is_file():
        raise ClusterError(f"{argv[0]} is missing: run `make tools` first")
    log = layout.log(component).open("ab")
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=layout.root, start_new_session=True
    )
    log.close()
    state.pids[component] = process.pid
    state.save(layout)
    return process


# ---------------------------------------------------------------------------------------------------------------
# up / down / status.


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
    if any(not _is_ours(state.pids.get(name, -1), layout) for name in COMPONENTS):
        return False
    return apiserver_ready(layout, state)


def _node_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _create_nodes(layout: Layout, state: State, num_nodes: int) -> None:
    for index in range(num_nodes):
        status, body = api_request(layout, state, "POST", "/api/v1/nodes", gpu_node_manifest(index))
        if status not in (201, 409):
            raise ClusterError(f"creating node gpu-node-{index} failed with HTTP {status}: {body}")


def _nodes_ready(layout: Layout, state: State, num_nodes: int) -> bool:
    status, body = api_request(layout, state, "GET", "/api/v1/nodes")
    if status != 200:
        return False
    ready = [n for n in body["items"] if _node_ready(n)]
    return len(ready) >= num_nodes


def describe_nodes(layout: Layout, state: State) -> str:
    """One line: how many Ready nodes with how many GPUs each, e.g. `4 Ready x 8 nvidia.com/gpu`."""
    status, body = api_request(layout, state, "GET", "/api/v1/nodes")
    if status != 200:
        return f"unknown (HTTP {status})"
    ready = [n for n in body["items"] if _node_ready(n)]
    gpus = sorted({n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0") for n in ready})
    return f"{len(ready)} Ready x {'/'.join(gpus) or '0'} nvidia.com/gpu"


def _default_service_account(layout: Layout, state: State) -> bool:
    return api_request(layout, state, "GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200


def _check_owned(layout: Layout) -> None:
    """Refuses to start in or remove a directory that is neither empty nor a cluster directory."""
    if layout.root.is_dir() and any(layout.root.iterdir()) and not layout.state.exists():
        raise ClusterError(f"{layout.root} is not empty and holds no state.json: refusing to use it")


def _start(layout: Layout, num_nodes: int, tools: Path) -> State:
    _check_owned(layout)
    if layout.root.exists():
        shutil.rmtree(layout.root)
    layout.logs.mkdir(parents=True)
    make_pki(layout.pki)
    ports = free_ports()
    state = State(ports=asdict(ports))
    state.save(layout)
    pki = layout.pki
    kubeconfig = kubeconfig_document(
        state.server, (pki / "ca.crt").read_text(), (pki / "admin.crt").read_text(), (pki / "admin.key").read_text()
    )
    layout.kubeconfig.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
    layout.kubeconfig.chmod(0o600)
    argv = command_lines(layout, ports, tools)

    etcd = _spawn("etcd", argv["etcd"], layout, state)
    etcd_health = f"http://127.0.0.1:{ports.etcd_client}/health"
    _wait_for("etcd /health", lambda: '"health":"true"' in _get(etcd_health)[1], "etcd", etcd, layout)

    apiserver = _spawn("kube-apiserver", argv["kube-apiserver"], layout, state)
    _wait_for("kube-apiserver /readyz", lambda: apiserver_ready(layout, state), "kube-apiserver", apiserver, layout)

    processes = {name: _spawn(name, argv[name], layout, state) for name in COMPONENTS[2:]}
    health = {
        "kube-controller-manager": f"https://127.0.0.1:{ports.controller_manager}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{ports.scheduler}/healthz",
        "kwok": f"http://127.0.0.1:{ports.kwok}/healthz",
    }
    for name, url in health.items():
        context = _unverified_context() if url.startswith("https") else None
        answers = functools.partial(_healthz_ok, url, context)
        _wait_for(f"{name} {url}", answers, name, processes[name], layout)

    _create_nodes(layout, state, num_nodes)
    _wait_for(
        f"{num_nodes} Ready nodes", lambda: _nodes_ready(layout, state, num_nodes), "kwok", processes["kwok"], layout
    )
    _wait_for(
        "the default ServiceAccount (controller-manager at work)",
        lambda: _default_service_account(layout, state),
        "kube-controller-manager",
        processes["kube-controller-manager"],
        layout,
    )
    state.ready = True
    state.save(layout)
    return state


def up(root: Path = DEFAULT_DIR, num_nodes: int = NUM_NODES, tools: Path = TOOLS_BIN) -> State:
    """Starts a cluster in `root`, or keeps the healthy one already there. On failure everything started is stopped."""
    if not 1 <= num_nodes <= MAX_NODES:
        raise ValueError(f"num_nodes must be between 1 and {MAX_NODES}, got {num_nodes}")
    layout = Layout(root.resolve())
    with _locked(layout):
        if is_healthy(layout.root):
            state = State.load(layout)
            assert state is not None
            return state
        if State.load(layout) is not None:
            print(f"local cluster: {layout.root} holds a stopped or broken cluster; starting afresh", file=sys.stderr)
        _stop(layout, remove=True)
        try:
            return _start(layout, num_nodes, tools)
        except BaseException:
            with contextlib.suppress(ClusterError):
                _stop(layout, remove=False)  # keep the logs the error message points to
            raise


def _stop(layout: Layout, remove: bool) -> None:
    state = State.load(layout)
    if state is not None:
        for name in reversed(COMPONENTS):
            if name in state.pids:
                _stop_group(state.pids[name], layout, grace_s=10.0)
    for pid in leftover_pids(layout):  # e.g. state.json was lost
        _stop_group(pid, layout, grace_s=5.0)
    left = leftover_pids(layout)
    if left:
        raise ClusterError(f"processes still running after stop: {left}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: .cluster)")
    parser.add_argument("--nodes", type=int, default=NUM_NODES, help="number of fake GPU nodes (default: 4)")
    args = parser.parse_args(argv)
    layout = Layout(args.dir.resolve())
    try:
        if args.command == "up":
            started = time.monotonic()
            already = is_healthy(layout.root)
            state = up(layout.root, args.nodes)
            verb = "already up" if already else f"up in {time.monotonic() - started:.1f}s"
            print(f"local cluster {verb}: {state.server}")
            print(f"  nodes:      {describe_nodes(layout, state)}")
            print(f"  kubeconfig: {layout.kubeconfig}")
            print(f"  logs:       {layout.logs}/")
            print(f"  try:        .tools/bin/kubectl --kubeconfig {layout.kubeconfig} get nodes")
        elif args.command == "down":
            down(layout.root)
            print("local cluster down: no process left")
        else:
            healthy = is_healthy(layout.root)
            print("up" if healthy else "down")
            return 0 if healthy else 1
    except (ClusterError, ValueError) as error:
        print(f"local cluster: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
