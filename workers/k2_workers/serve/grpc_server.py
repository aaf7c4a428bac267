"""A gRPC server of ours: `grpc.health.v1`, server reflection and, where generation is served (a group's rank 0, the
frontend), the generation service (`grpc_api`). No torch here.

Health: `""` (liveness) is SERVING while the server runs; `k2.serve.v1.Generation` (readiness, what the pods' `grpc:`
probes ask) is SERVING while `unready()` is None, refreshed on every Check and every `HEALTH_POLL_S` for watchers,
and NOT_SERVING for good once the server drains. Concurrency is bounded: `max_rpcs` at once, one more gets
RESOURCE_EXHAUSTED from grpcio itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2_workers.serve.grpc_api import SERVICE, Generation, generation_handler

HEALTH_POLL_S = 1.0
DEFAULT_MAX_RPCS = 64
MAX_MESSAGE_BYTES = 1 << 20  # a larger request is refused with RESOURCE_EXHAUSTED, as the HTTP body limit


class ReadinessHealth(health.HealthServicer):  # type: ignore[misc]  # grpcio-health-checking ships no types
    """`grpc.health.v1.Health` whose readiness follows `unready()`."""

    def __init__(self, unready: Callable[[], str | None]) -> None:
        super().__init__()
        self._unready = unready
        self._stopped = threading.Event()
        self.set("", health_pb2.HealthCheckResponse.SERVING)
        self.refresh()
        threading.Thread(target=self._poll, name="grpc-health", daemon=True).start()

    def refresh(self) -> None:
        serving = self._unready() is None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.set(SERVICE, status)  # ignored once draining: NOT_SERVING stays

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> object:
        self.refresh()
        return super().Check(request, context)

    def stop(self) -> None:
        self._stopped.set()

    def _poll(self) -> None:
        while not self._stopped.wait(HEALTH_POLL_S):
            self.refresh()


@dataclass
class GrpcServer:
    server: grpc.Server
    port: int
    health: ReadinessHealth

    def drain(self) -> None:
        """Every health service NOT_SERVING from now on (the probes take the pod out of its Service)."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking RPCs; the ones in flight get `grace_s` to finish."""
        self.health.stop()
        self.server.stop(grace_s).wait()


def serve_grpc(
    host: str,
    port: int,
    unready: Callable[[], str | None],
    generation: Generation | None = None,
    max_rpcs: int = DEFAULT_MAX_RPCS,
) -> GrpcServer:
    """Start serving health, reflection and `generation` (when given) on host:port (0: any free port)."""
    if max_rpcs < 1:
        raise ValueError(f"max_rpcs: must be >= 1, got {max_rpcs}")
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(
        ThreadPoolExecutor(max_rpcs, thread_name_prefix="grpc"), maximum_concurrent_rpcs=max_rpcs, options=options
    )
    readiness = ReadinessHealth(unready)
    health_pb2_grpc.add_HealthServicer_to_server(readiness, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    if generation is not None:
        server.add_generic_rpc_handlers((generation_handler(generation),))
        names.append(SERVICE)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC: cannot listen on {host}:{port}")
    server.start()
    return GrpcServer(server, bound, readiness)
