"""The generation service on the frontend: each RPC goes to the groups' rank 0 the way HTTP requests do (`frontend`).

Round-robin over the groups; a request moves on to the next group only when its group did not take it (UNAVAILABLE:
unreachable, not ready or stopping; RESOURCE_EXHAUSTED: its queue is full), so no two groups ever run it; for a
stream, only before its first message. Any other status is the answer. When no group took it, the call waits for
one (`group_wait`: more rounds, with pauses, within the client's deadline), as HTTP requests do. The client's
deadline travels with the call, and a client that cancels cancels the group's call (which cancels the request
there). `Abort` asks every group, `GetLoad` reports every group, `GetModelInfo` the first that answers. No torch.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import grpc

from k2_workers.serve.group_wait import GroupWait
from k2_workers.serve.grpc_api import GenerationStub, time_left_s
from k2_workers.serve.proto import generation_pb2 as pb

NOT_TAKEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class FrontendGeneration:
    """`grpc_api.Generation` in front of the groups' rank 0 (`targets`: host:port of each)."""

    def __init__(self, targets: Sequence[str], wait: GroupWait | None = None) -> None:
        if not targets:
            raise ValueError("grpc endpoints: the frontend needs at least one group")
        self.targets = list(targets)
        self._channels = [grpc.insecure_channel(t) for t in self.targets]
        self._stubs = [GenerationStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self.targets)))
        self._lock = threading.Lock()
        self._wait = wait or GroupWait()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        refusals: list[tuple[str, grpc.RpcError]] = []
        for target, stub in self._until_taken(context, refusals):
            try:
                response: pb.GenerateResponse = stub.Generate(request, timeout=time_left_s(context))
                return response
            except grpc.RpcError as error:
                if error.code() not in NOT_TAKEN:
                    _abort(context, error.code(), error.details())
                refusals.append((target, error))
        _abort_not_taken(context, refusals)

    def generate_stream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        refusals: list[tuple[str, grpc.RpcError]] = []
        for target, stub in self._until_taken(context, refusals):
            call = stub.GenerateStream(request, timeout=time_left_s(context))
            context.add_callback(call.cancel)  # our client gone: the group's call too
            try:
                first = next(call)
            except StopIteration:
                return
            except grpc.RpcError as error:
                if error.code() not in NOT_TAKEN:
                    _abort(context, error.code(), error.details())
                refusals.append((target, error))
                continue
            yield first
            try:
                yield from call
            except grpc.RpcError as error:  # the group took it: its status is the answer
                _abort(context, error.code(), error.details())
            return
        _abort_not_taken(context, refusals)

    def abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        answers = self._each(lambda stub: stub.Abort(request, timeout=time_left_s(context)))
        return pb.AbortResponse(found=any(a.found for _, a in answers))

    def model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        for _, stub in self._in_order():
            try:
                info: pb.ModelInfo = stub.GetModelInfo(request, timeout=time_left_s(context))
                return info
            except grpc.RpcError:
                continue
        _abort(context, grpc.StatusCode.UNAVAILABLE, "no group answered")

    def load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        groups = []
        for target, answer in self._each(lambda stub: stub.GetLoad(request, timeout=time_left_s(context))):
            for group in answer.groups:
                group.group = group.group or target
                groups.append(group)
        return pb.LoadResponse(groups=groups)

    def _in_order(self) -> Iterator[tuple[str, GenerationStub]]:
        with self._lock:
            start = next(self._next)
        for offset in range(len(self.targets)):
            index = (start + offset) % len(self.targets)
            yield self.targets[index], self._stubs[index]

    def _until_taken(
        self, context: grpc.ServicerContext, refusals: list[tuple[str, grpc.RpcError]]
    ) -> Iterator[tuple[str, GenerationStub]]:
        """The groups in round-robin order, round after round while none takes the call (`refusals` holds the
        current round's), until the wait or the client's deadline ends, the client leaves, or every queue is full."""
        for _ in self._wait.rounds(time_left_s(context)):
            if not context.is_active():
                return
            refusals.clear()
            yield from self._in_order()
            if {error.code() for _, error in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
                return

    def _each(self, call: Callable[[GenerationStub], Any]) -> list[tuple[str, Any]]:
        """The answers of the groups that answer."""
        answers = []
        for target, stub in zip(self.targets, self._stubs, strict=True):
            try:
                answers.append((target, call(stub)))
            except grpc.RpcError:
                continue
        return answers


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")


def _abort_not_taken(context: grpc.ServicerContext, refusals: list[tuple[str, grpc.RpcError]]) -> NoReturn:
    """No group took the request: RESOURCE_EXHAUSTED when every queue was full, else UNAVAILABLE."""
    codes = {error.code() for _, error in refusals}
    code = (
        grpc.StatusCode.RESOURCE_EXHAUSTED
        if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        else grpc.StatusCode.UNAVAILABLE
    )
    details = "; ".join(f"{target}: {error.details()}" for target, error in refusals)
    _abort(context, code, f"no group could serve the request: {details}")
