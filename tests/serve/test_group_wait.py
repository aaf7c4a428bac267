"""A request that no group took waits for one (`group_wait`): rounds over the groups with doubling pauses, the HTTP
and the gRPC frontend alike, so a group that is briefly away (a rolling update, a gang restart, a stale DNS answer)
costs the client latency, not a failed request. Every queue full is answered at once; no group within the wait is
503 / UNAVAILABLE after more than one round."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http import HTTPStatus

import grpc
import pytest

from k2_workers.serve.frontend import GroupRouter
from k2_workers.serve.group_wait import FIRST_PAUSE_S, MAX_PAUSE_S, GroupWait
from k2_workers.serve.grpc_api import GenerationStub
from k2_workers.serve.grpc_frontend import FrontendGeneration
from k2_workers.serve.grpc_server import GrpcServer, serve_grpc
from k2_workers.serve.http_routes import HttpError
from k2_workers.serve.proto import generation_pb2 as pb
from tests.serve.test_frontend import StubGroup
from tests.support.ports import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def test_rounds_pause_doubling_up_to_the_cap_and_none_starts_after_the_wait() -> None:
    clock = FakeClock()
    rounds = list(GroupWait(10.0).rounds(clock=lambda: clock.now, sleep=clock.sleep))
    assert clock.pauses[:4] == [FIRST_PAUSE_S, 2 * FIRST_PAUSE_S, 4 * FIRST_PAUSE_S, MAX_PAUSE_S]
    assert max(clock.pauses) == MAX_PAUSE_S and sum(clock.pauses) == pytest.approx(10.0)
    assert rounds == list(range(len(clock.pauses) + 1)) and clock.now == pytest.approx(110.0)


def test_the_callers_time_left_caps_the_wait_and_zero_is_one_round() -> None:
    clock = FakeClock()
    assert len(list(GroupWait(10.0).rounds(1.0, clock=lambda: clock.now, sleep=clock.sleep))) == 4  # .25 .5 .25
    assert sum(clock.pauses) == pytest.approx(1.0)
    assert list(GroupWait(0).rounds(clock=lambda: clock.now, sleep=clock.sleep)) == [0]


@pytest.mark.parametrize("wait_s", [-1.0, float("nan")])
def test_a_negative_wait_is_refused(wait_s: float) -> None:
    with pytest.raises(ValueError, match="wait_s"):
        GroupWait(wait_s)


def test_a_group_that_comes_back_during_the_wait_serves_the_request() -> None:
    port = free_port()
    late: list[StubGroup] = []
    starter = threading.Timer(1.0, lambda: late.append(StubGroup(200, port=port)))
    starter.start()
    try:
        status, body = GroupRouter([f"http://127.0.0.1:{port}"], wait=GroupWait(20)).forward("/v1/generate", b"{}")
    finally:
        starter.join()
        for group in late:
            group.server.shutdown()
            group.server.server_close()
    assert (status, body["group"], late[0].calls) == (200, f"http://127.0.0.1:{port}", 1)


def test_no_group_within_the_wait_is_a_503_after_several_rounds() -> None:
    unready = StubGroup(503)
    try:
        with pytest.raises(HttpError) as caught:
            GroupRouter([unready.url], wait=GroupWait(1.0)).forward("/v1/generate", b"{}")
    finally:
        unready.server.shutdown()
        unready.server.server_close()
    assert caught.value.status == HTTPStatus.SERVICE_UNAVAILABLE and unready.calls >= 3


class RefusingFirst:
    """A rank 0's generation service that refuses its first `refusals` calls with `code`, then answers."""

    def __init__(self, refusals: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.refusals, self.code, self.calls = refusals, code, 0

    def generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        self.calls += 1
        if self.calls <= self.refusals:
            context.abort(self.code, f"refusal {self.calls}")
        return pb.GenerateResponse(text=request.text.upper())

    def generate_stream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        yield pb.GenerateStreamResponse(text=self.generate(request, context).text)

    def abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    def model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo()

    def load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        return pb.LoadResponse()


@pytest.fixture
def serve() -> Iterator[list[GrpcServer]]:
    servers: list[GrpcServer] = []
    yield servers
    for server in servers:
        server.stop(0)


def frontend_stub(serve: list[GrpcServer], group: RefusingFirst, wait_s: float) -> GenerationStub:
    rank = serve_grpc("127.0.0.1", 0, lambda: None, group)
    frontend = serve_grpc(
        "127.0.0.1", 0, lambda: None, FrontendGeneration([f"127.0.0.1:{rank.port}"], GroupWait(wait_s))
    )
    serve += [frontend, rank]
    return GenerationStub(grpc.insecure_channel(f"127.0.0.1:{frontend.port}"))


def test_a_grpc_call_no_group_took_is_tried_again_until_one_does(serve: list[GrpcServer]) -> None:
    group = RefusingFirst(3)
    answer = frontend_stub(serve, group, 20).Generate(pb.GenerateRequest(text="moe"), timeout=30)
    assert (answer.text, group.calls) == ("MOE", 4)
    streamed = list(
        frontend_stub(serve, RefusingFirst(2), 20).GenerateStream(pb.GenerateRequest(text="ep"), timeout=30)
    )
    assert [message.text for message in streamed] == ["EP"]


def test_a_grpc_call_no_group_took_within_the_wait_is_unavailable(serve: list[GrpcServer]) -> None:
    group = RefusingFirst(1000)
    with pytest.raises(grpc.RpcError) as caught:
        frontend_stub(serve, group, 1.0).Generate(pb.GenerateRequest(text="moe"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and group.calls >= 3


def test_every_queue_full_is_resource_exhausted_at_once(serve: list[GrpcServer]) -> None:
    group = RefusingFirst(1000, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.RpcError) as caught:
        frontend_stub(serve, group, 20).Generate(pb.GenerateRequest(text="moe"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and group.calls == 1
