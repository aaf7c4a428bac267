"""CoreDNS as the cluster DNS: a host process answering on the bridge address, cluster names only.

It serves only the cluster's zones and has no `forward` plugin: any other name is refused, so no query ever leaves
this machine.
"""

from __future__ import annotations

from pathlib import Path

from .network import GATEWAY


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    return f"""cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"""


def argv(coredns_bin: Path, corefile_path: Path) -> list[str]:
    return [str(coredns_bin), f"-conf={corefile_path}"]
