"""Starting a rank's gRPC server, where grpcio is installed (imported lazily, as in grpc_start, whose frontend side
must not import the engine and torch)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from k2_workers.serve.grpc_start import MISSING

if TYPE_CHECKING:
    from k2_workers.serve.engine import GroupEngine
    from k2_workers.serve.grpc_server import GrpcServer

log = logging.getLogger(__name__)


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
