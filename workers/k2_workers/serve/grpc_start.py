"""Starting the gRPC server of a rank or of the frontend, where grpcio is installed: its modules are imported here,
lazily, so that a process without grpcio still serves HTTP (and says once why gRPC is off)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k2_workers.serve.engine import GroupEngine
    from k2_workers.serve.grpc_server import GrpcServer

log = logging.getLogger(__name__)

MISSING = "gRPC is off: %s (it needs grpcio, grpcio-health-checking and grpcio-reflection)"


def start_rank_grpc(
    host: str, port: int, engine: GroupEngine, max_new_tokens_limit: int, model: str, group: str
) -> GrpcServer | None:
    """Health and reflection on every rank, and the generation service on rank 0; None when `port` < 0 (off)."""
    if port < 0:
        return None
    try:
        from k2_workers.serve.grpc_rank import RankGeneration
        from k2_workers.serve.grpc_server import serve_grpc
    except ImportError as error:
        log.error(MISSING, error)
        return None
    generation = RankGeneration(engine, max_new_tokens_limit, model, group) if engine.rank == 0 else None
    server = serve_grpc(host, port, lambda: engine.unready, generation)
    log.info("rank %d gRPC on %s:%d", engine.rank, host, server.port)
    return server


def start_frontend_grpc(host: str, port: int, targets: Sequence[str]) -> GrpcServer | None:
    """The generation service routed across the groups' rank 0 (`targets`: host:port); None when `port` < 0."""
    if port < 0:
        return None
    try:
        from k2_workers.serve.grpc_frontend import FrontendGeneration
        from k2_workers.serve.grpc_server import serve_grpc
    except ImportError as error:
        log.error(MISSING, error)
        return None
    server = serve_grpc(host, port, lambda: None, FrontendGeneration(targets))
    log.info("frontend gRPC on %s:%d routing across %d groups", host, server.port, len(targets))
    return server
