"""The gRPC generation service (`proto/generation.proto`): its name, its methods bound to the generated messages, the
server-side handler of any implementation, and a typed client stub. No torch here: the frontend uses it too.

The methods are registered by hand (`generation_handler`) instead of with grpcio-tools' generated service module, so
only the messages are generated code. Bad input is `INVALID_ARGUMENT` with a message that names the field, an
overloaded server `RESOURCE_EXHAUSTED`, one that cannot serve now `UNAVAILABLE`, a request past its deadline
`DEADLINE_EXCEEDED`, an aborted one `CANCELLED`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from k2_api.contract import GrpcServices
from k2_workers.serve.proto import generation_pb2 as pb

SERVICE = GrpcServices.GENERATION  # the proto's package.Service, also the health service name of readiness
NO_DEADLINE_S = 1e8  # grpcio reports a call without a deadline as (about) infinitely long


def time_left_s(context: grpc.ServicerContext) -> float | None:
    """The seconds left before the client's deadline; None when it set none."""
    left = context.time_remaining()
    return None if left is None or not math.isfinite(left) or left > NO_DEADLINE_S else float(left)


class Generation(Protocol):
    """What serves the generation service (a rank 0, or the frontend in front of the groups)."""

    def generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse: ...

    def generate_stream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]: ...

    def abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse: ...

    def model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo: ...

    def load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse: ...


# method name -> (request message, response message, server-streaming)
METHODS: dict[str, tuple[Any, Any, bool]] = {
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, False),
    "GenerateStream": (pb.GenerateRequest, pb.GenerateStreamResponse, True),
    "Abort": (pb.AbortRequest, pb.AbortResponse, False),
    "GetModelInfo": (pb.ModelInfoRequest, pb.ModelInfo, False),
    "GetLoad": (pb.LoadRequest, pb.LoadResponse, False),
}


def generation_handler(service: Generation) -> grpc.GenericRpcHandler:
    """The service's methods, served by `service`."""
    implementations: dict[str, Callable[..., Any]] = {
        "Generate": service.generate,
        "GenerateStream": service.generate_stream,
        "Abort": service.abort,
        "GetModelInfo": service.model_info,
        "GetLoad": service.load,
    }
    handlers = {}
    for name, (request, response, streaming) in METHODS.items():
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(
            implementations[name],
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class GenerationStub:
    """A client of the generation service over `channel`."""

    def __init__(self, channel: grpc.Channel) -> None:
        def method(name: str) -> Any:
            request, response, streaming = METHODS[name]
            make = channel.unary_stream if streaming else channel.unary_unary
            return make(
                f"/{SERVICE}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )

        self.Generate: grpc.UnaryUnaryMultiCallable = method("Generate")
        self.GenerateStream: grpc.UnaryStreamMultiCallable = method("GenerateStream")
        self.Abort: grpc.UnaryUnaryMultiCallable = method("Abort")
        self.GetModelInfo: grpc.UnaryUnaryMultiCallable = method("GetModelInfo")
        self.GetLoad: grpc.UnaryUnaryMultiCallable = method("GetLoad")
