"""The gRPC edge under load, with real grpcio clients through a frontend to a group's server: slow readers, streams
whose client stopped reading, and cancelled calls hold at most `max_rpcs` calls and threads on each server; calls
beyond that get RESOURCE_EXHAUSTED at once; a stalled stream is freed at its deadline and a cancelled one at once,
on the group's server too; and afterwards the same good requests succeed. `-s` prints the figures.

The group's side is a token source without an engine (no torch): the bounds under test are the servers'."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from k2_workers.serve.grpc_api import GenerationStub
from k2_workers.serve.grpc_frontend import FrontendGeneration
from k2_workers.serve.grpc_server import serve_grpc
from k2_workers.serve.proto import generation_pb2 as pb
from tests.support.waits import wait_for

MAX_RPCS = 8  # on the frontend and on the group's server
PIECE = "x" * 16384  # per message: a stalled client's flow-control window fills after a few
PAUSE_S = 0.01  # between two messages of the source
SLOW_READERS, STALLED, CANCELLED, BEYOND = 4, 4, 4, 16
SLOW_MESSAGES = 20
SLOW_READ_S = 0.1  # a slow reader's pause between two messages
STALL_DEADLINE_S = 10.0  # outlasts filling the slots and the refusals, even on a loaded machine
ENDLESS = 100_000  # messages: a stream that only its client's deadline or cancel ends


@dataclass
class TokenSource:
    """A group's generation service without an engine: `max_new_tokens` messages of PIECE, one per PAUSE_S, while
    the call is active; counts the calls in progress."""

    active: int = 0
    most: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        return pb.GenerateResponse(text="ok", token_ids=[1, 2], batch_size=1)

    def generate_stream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            for index in range(request.sampling.max_new_tokens):
                if not context.is_active():
                    return
                time.sleep(PAUSE_S)
                yield pb.GenerateStreamResponse(text=PIECE, token_ids=[index])
        finally:
            with self.lock:
                self.active -= 1

    def abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=False)

    def model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(model="load")

    def load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        return pb.LoadResponse()


def stream_request(messages: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="p", sampling=pb.SamplingParams(max_new_tokens=messages))


def grpc_threads() -> set[int]:
    """The gRPC servers' worker threads in this process (every server's pool names them grpc_N)."""
    return {t.ident for t in threading.enumerate() if t.name.startswith("grpc_") and t.ident is not None}


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@dataclass
class Served:
    stub: GenerationStub
    source: TokenSource
    older_threads: set[int]
    """gRPC threads of servers other tests of the session left running, not counted here."""

    def server_threads(self) -> int:
        """The worker threads of this test's two servers."""
        return len(grpc_threads() - self.older_threads)


@pytest.fixture
def frontend() -> Iterator[Served]:
    older_threads = grpc_threads()
    source = TokenSource()
    group = serve_grpc("127.0.0.1", 0, lambda: None, source, max_rpcs=MAX_RPCS)
    proxy = FrontendGeneration([f"127.0.0.1:{group.port}"])
    front = serve_grpc("127.0.0.1", 0, lambda: None, proxy, max_rpcs=MAX_RPCS)
    channel = grpc.insecure_channel(f"127.0.0.1:{front.port}")
    try:
        yield Served(GenerationStub(channel), source, older_threads)
    finally:
        channel.close()
        proxy.close()
        front.stop(0)
        group.stop(0)


def test_slow_stalled_and_cancelled_streams_stay_bounded_and_a_good_request_succeeds_after(
    frontend: Served,
) -> None:
    stub, source = frontend.stub, frontend.source
    threads_before, rss_before = threading.active_count(), rss_kib()
    assert list(stub.GenerateStream(stream_request(3), timeout=30))  # warm: channels connected, pools started

    counted = threading.Event()  # the refusals are counted: until then a slow reader holds its slot after one message

    def slow_reader() -> int:
        received = 0
        for _ in stub.GenerateStream(stream_request(SLOW_MESSAGES), timeout=60):
            received += 1
            if received == 1:
                counted.wait(30)
            time.sleep(SLOW_READ_S)
        return received

    clients = ThreadPoolExecutor(SLOW_READERS)
    slow = [clients.submit(slow_reader) for _ in range(SLOW_READERS)]
    stalled = [stub.GenerateStream(stream_request(ENDLESS), timeout=STALL_DEADLINE_S) for _ in range(STALLED)]
    for call in stalled:
        next(call)  # one message, then this client reads no more
    wait_for("every slot taken", lambda: source.active == MAX_RPCS)

    refused, peak_threads = 0, frontend.server_threads()
    for _ in range(BEYOND):
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.GenerateStream(stream_request(ENDLESS), timeout=30))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        refused += 1
        peak_threads = max(peak_threads, frontend.server_threads())
    rss_peak = rss_kib()
    assert source.active == MAX_RPCS and source.most == MAX_RPCS
    counted.set()

    assert [s.result(timeout=60) for s in slow] == [SLOW_MESSAGES] * SLOW_READERS  # slow, but served whole
    for call in stalled:  # held until their deadline, although their client never read again
        with pytest.raises(grpc.RpcError) as caught:
            for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for("the stalled streams freed on the group's server", lambda: source.active == 0)

    cancelled = [stub.GenerateStream(stream_request(ENDLESS), timeout=60) for _ in range(CANCELLED)]
    for call in cancelled:
        next(call)
    wait_for("the cancelled calls running", lambda: source.active == CANCELLED)
    for call in cancelled:
        call.cancel()
    wait_for("the cancelled calls freed on the group's server", lambda: source.active == 0)
    clients.shutdown()

    messages = list(stub.GenerateStream(stream_request(SLOW_MESSAGES), timeout=30))
    assert [m.token_ids[0] for m in messages] == list(range(SLOW_MESSAGES))
    assert stub.Generate(pb.GenerateRequest(text="p"), timeout=30).text == "ok"
    assert peak_threads <= 2 * MAX_RPCS  # the two servers' pools, never a thread per call
    assert source.most == MAX_RPCS
    print(
        f"\ngRPC load: max_rpcs {MAX_RPCS} per server; {SLOW_READERS} slow readers, {STALLED} stalled "
        f"({STALL_DEADLINE_S:.0f} s deadline), {CANCELLED} cancelled, {BEYOND} beyond the limit -> {refused} "
        f"RESOURCE_EXHAUSTED; calls at once on the group's server at most {source.most}; gRPC server threads at "
        f"most {peak_threads}; process threads {threads_before} before, {threading.active_count()} after; "
        f"RSS {rss_before // 1024} MiB before, {rss_peak // 1024} MiB under load, {rss_kib() // 1024} MiB after"
    )
