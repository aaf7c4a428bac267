"""Host network state of the real node: the pod bridge, routes that keep fake addresses here, firewall rules.

Every change is undone by `teardown`, which works from names alone (it also runs when state.json is lost):
  - the bridge BRIDGE with the gateway address, the only link between the host and the pods; its alias names the
    directory of the cluster that made it, so that a later cluster can tell a live real node from one whose cluster
    was killed without its `down` (see `bridge_owner`);
  - `unreachable` routes for kwok's fake pod and node ranges, and the Service range routed to the bridge, so that
    a dial to an address nothing serves fails here instead of following the default route off the machine;
  - the chains K2-FORWARD (pods talk only to pods and the host) and K2-PREROUTING (the `kubernetes` Service
    address 10.96.0.1:443 is rewritten to the apiserver on 127.0.0.1, allowed by route_localnet on the bridge; so is
    GATEWAY:PORT for each loopback server exposed to pods, e.g. the cluster's Prometheus);
  - the chains that kubelet, kube-proxy and the portmap plugin add (KUBE-*, CNI-*), and the nft tables that
    iptables-nft created for them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .errors import ClusterError
from .nodes import NODE_IP, POD_CIDR, SERVICE_CIDR

BRIDGE = "k2br0"
OWNER_ALIAS = "k2 real node of "  # + the cluster's directory: the bridge's alias (IFALIASZ allows 255 bytes)
# The real node's pods, apart from kwok's 10.244.0.0/16. host-local hands out its addresses in turn, so a /16 reuses
# none within a cluster's life: in a /24 the suite's few hundred pods wrapped around, a new pod got an address its
# peers' kernels still mapped to the dead pod's MAC, and connections to it stalled for a minute (a rolling update's
# requests took 70 s instead of 12 s; e2e/test_live_loop.py with the range filled).
REAL_POD_CIDR = "10.245.0.0/16"
GATEWAY = "10.245.0.1"  # the bridge's address: the real node's InternalIP, CoreDNS, the pods' gateway
KWOK_NODE_CIDR = NODE_IP.format(0) + "/24"
UNREACHABLE = (POD_CIDR, KWOK_NODE_CIDR)
KUBERNETES_SERVICE_IP = "10.96.0.1"
OUR_CHAINS = re.compile(r"^(K2|KUBE|CNI)-")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def firewall_rules(apiserver_port: int) -> str:
    """iptables-restore input (applied with --noflush) for the chains K2-FORWARD and K2-PREROUTING."""
    dnat = f"-d {KUBERNETES_SERVICE_IP}/32 -p tcp --dport 443 -j DNAT --to-destination 127.0.0.1:{apiserver_port}"
    return f"""*filter
:K2-FORWARD - [0:0]
-A K2-FORWARD -i {BRIDGE} -o {BRIDGE} -j ACCEPT
-A K2-FORWARD -i {BRIDGE} -j REJECT
-A K2-FORWARD -o {BRIDGE} -j REJECT
-I FORWARD 1 -j K2-FORWARD
COMMIT
*nat
:K2-PREROUTING - [0:0]
-A K2-PREROUTING -i {BRIDGE} {dnat}
-I PREROUTING 1 -j K2-PREROUTING
COMMIT
"""


def gateway_dnat(port: int) -> list[str]:
    """The K2-PREROUTING rule that takes pods' connections to GATEWAY:`port` to the host's 127.0.0.1:`port`."""
    match = ["-i", BRIDGE, "-d", f"{GATEWAY}/32", "-p", "tcp", "--dport", str(port)]
    return [*match, "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}"]


def expose_on_gateway(port: int) -> None:
    """Lets the real node's pods reach a host server listening on 127.0.0.1:`port` at GATEWAY:`port` (as the
    `kubernetes` Service reaches the apiserver); the host's other loopback ports stay closed to pods. Idempotent."""
    rule = gateway_dnat(port)
    if _run("iptables", "-t", "nat", "-C", "K2-PREROUTING", *rule, check=False).returncode != 0:
        _run("iptables", "-t", "nat", "-A", "K2-PREROUTING", *rule)


def withdraw_from_gateway(port: int) -> None:
    """Undoes `expose_on_gateway` (teardown also flushes K2-PREROUTING); a no-op when the rule is gone."""
    _run("iptables", "-t", "nat", "-D", "K2-PREROUTING", *gateway_dnat(port), check=False)


def cleanup_rules(saved: str) -> str:
    """iptables-restore input (with --noflush) that deletes every rule jumping to one of our chains, then the chains.

    `saved` is `iptables-save` output. Only chains matching OUR_CHAINS and rules referring to them are touched.
    """
    out: list[str] = []
    table: str | None = None
    chains: list[str] = []
    deletes: list[str] = []
    for line in [*saved.splitlines(), "*end"]:
        if line.startswith("*"):
            if table is not None and (chains or deletes):
                out += [f"*{table}", *deletes, *(f"-F {c}" for c in chains), *(f"-X {c}" for c in chains), "COMMIT"]
            table, chains, deletes = line[1:], [], []
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if OUR_CHAINS.match(name):
                chains.append(name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            target = re.search(r" -[jg] (\S+)", line)
            if not OUR_CHAINS.match(chain) and target and OUR_CHAINS.match(target.group(1)):
                deletes.append("-D " + line[3:])
    return "\n".join(out) + "\n" if out else ""


def nft_tables() -> set[str]:
    """The nft tables as `family name`; empty when the nft command is missing."""
    result = _run("nft", "list", "tables", check=False) if _have("nft") else None
    if result is None or result.returncode != 0:
        return set()
    return {line.removeprefix("table ").strip() for line in result.stdout.splitlines() if line.startswith("table ")}


def _have(command: str) -> bool:
    return shutil.which(command) is not None


def bridge_exists() -> bool:
    return Path(f"/sys/class/net/{BRIDGE}").exists()


def bridge_owner() -> Path | None:
    """The directory of the cluster whose real node made the bridge, as its alias says; None when there is no bridge."""
    alias_file = Path(f"/sys/class/net/{BRIDGE}/ifalias")
    try:
        alias = alias_file.read_text().strip()
    except FileNotFoundError:
        return None
    if not alias.startswith(OWNER_ALIAS):
        raise ClusterError(
            f"the interface {BRIDGE} exists but names no cluster directory (its alias is {alias!r}): stop whatever "
            f"runs on it, then `ip link delete {BRIDGE}`"
        )
    return Path(alias.removeprefix(OWNER_ALIAS))


def setup(apiserver_port: int, owner: Path) -> None:
    """The bridge (named after the `owner` cluster's directory), the routes and our firewall chains. Fails when the
    bridge exists: one real node per machine."""
    if bridge_exists():
        raise ClusterError(f"the interface {BRIDGE} exists: another real node runs here (its cluster-down removes it)")
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "link", "set", "dev", BRIDGE, "alias", f"{OWNER_ALIAS}{owner}")
    _run("ip", "addr", "add", f"{GATEWAY}/{REAL_POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1\n")
    for cidr in UNREACHABLE:
        _run("ip", "route", "replace", "unreachable", cidr)
    _run("ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", GATEWAY)
    _run("iptables-restore", "--noflush", stdin=firewall_rules(apiserver_port))
    IP_FORWARD.write_text("1\n")  # pod -> Service -> pod is routed through the host


def teardown(nft_baseline: Iterable[str] | None, ip_forward: str | None) -> None:
    """Undoes `setup` and what the node's components added; a no-op for what is already gone."""
    for save, restore in (("iptables-save", "iptables-restore"), ("ip6tables-save", "ip6tables-restore")):
        if not _have(save):
            continue
        script = cleanup_rules(_run(save).stdout)
        if script:
            _run(restore, "--noflush", stdin=script)
    if nft_baseline is not None:
        for table in sorted(nft_tables() - set(nft_baseline)):
            _run("nft", "delete", "table", *table.split(), check=False)
    for cidr in UNREACHABLE:
        _run("ip", "route", "del", "unreachable", cidr, check=False)
    _run("ip", "route", "del", SERVICE_CIDR, "dev", BRIDGE, check=False)
    if bridge_exists():
        _run("ip", "link", "delete", BRIDGE)
    if ip_forward is not None:
        IP_FORWARD.write_text(ip_forward)


def leftovers() -> list[str]:
    """What of the real node's network is still here (empty after a clean teardown)."""
    found: list[str] = []
    if bridge_exists():
        found.append(f"interface {BRIDGE}")
    veths = _run("ip", "-o", "link", "show", "type", "veth", check=False).stdout
    found += [f"interface {line.split(':')[1].strip()}" for line in veths.splitlines() if line.strip()]
    routes = _run("ip", "route", "show", check=False).stdout
    found += [f"route {line}" for line in routes.splitlines() if any(c in line for c in (*UNREACHABLE, SERVICE_CIDR))]
    for save in ("iptables-save", "ip6tables-save"):
        if _have(save):
            rules = _run(save).stdout.splitlines()
            found += [f"{save}: {line}" for line in rules if re.search(r"\b(K2|KUBE|CNI)-", line)]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [f"network namespace {p.name}" for p in netns.iterdir() if p.name.startswith("cni-")]
    return found
