"""A two-node Ray cluster on this machine's loopback for tests: `python -m tests.ray.two_nodes TEMP_DIR` starts a
head and a worker node (1 CPU each, both 127.0.0.1; `ray.cluster_utils.Cluster`), prints the head's address on a
line of its own, and shuts both down when its stdin closes. TEMP_DIR keeps its session files (and the address
file `ray.init()` would find) apart from any other Ray on the machine."""

from __future__ import annotations

import os
import sys

from k2_workers.ray_run.cluster import LOCAL_ENV, LOOPBACK


def main() -> None:
    os.environ.update(LOCAL_ENV)  # before ray is imported: both nodes advertise and bind 127.0.0.1
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": LOOPBACK, "temp_dir": sys.argv[1]}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()


if __name__ == "__main__":
    main()
