"""Starting the frontend's gRPC server, where grpcio is installed: its modules are imported here, lazily, so that a
process without grpcio still serves HTTP (and says once why gRPC is off). A rank's: grpc_rank_start (this module
imports no torch, for the frontend)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from k2_workers.serve.group_wait import GroupWait

if TYPE_CHECKING:
    from k2_workers.serve.grpc_server import GrpcServer

log = logging.getLogger(__name__)

MISSING = "gRPC is off: %s (it needs grpcio, grpcio-health-checking and grpcio-reflection)"


def start_frontend_grpc(
    host: str, port: int, targets: Sequence[str], wait: GroupWait | None = None
) -> GrpcServer | None:
    """The generation service routed across the groups' rank 0 (`targets`: host:port); None when `port` < 0."""
    if port < 0:
        return None
    try:
        from k2_workers.serve.grpc_frontend import FrontendGeneration
        from k2_workers.serve.grpc_server import serve_grpc
    except ImportError as error:
        log.error(MISSING, error)
        return None
    server = serve_grpc(host, port, lambda: None, FrontendGeneration(targets, wait))
    log.info("frontend gRPC on %s:%d routing across %d groups", host, server.port, len(targets))
    return server
