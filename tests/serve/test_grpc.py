"""The gRPC generation service with the real grpcio client, on rank 0 (one rank over an in-process gloo group) and on a
frontend in front of it: unary and streaming outputs equal the engine's direct one, `grpc.health.v1` follows
readiness, reflection lists the services, bad input is INVALID_ARGUMENT naming the field, a full queue
RESOURCE_EXHAUSTED, a deadline is honoured (the request leaves the queue), and Abort takes a request out of its
batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch.distributed as dist
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.grpc_api import SERVICE, GenerationStub
from k2_workers.serve.grpc_frontend import FrontendGeneration
from k2_workers.serve.grpc_rank import RankGeneration
from k2_workers.serve.grpc_server import GrpcServer, serve_grpc
from k2_workers.serve.openai_response import finish
from k2_workers.serve.proto import generation_pb2 as pb
from k2_workers.serve.request import GenerateParams
from k2_workers.tokenizer import ByteTokenizer
from tests.serve.test_stream import Steps, ascii_stop, one_rank_engine
from tests.support.waits import wait_for

MODEL = "k2-grpc"
PROMPT = "The expert placement is a Kubernetes object"
TOKENIZER = ByteTokenizer()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Served:
    engine: GroupEngine
    steps: Steps
    servers: dict[str, GrpcServer]  # "rank" and "frontend"
    channels: dict[str, grpc.Channel]


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    engine, steps = one_rank_engine()
    rank = serve_grpc("127.0.0.1", 0, lambda: engine.unready, RankGeneration(engine, 256, MODEL, "group-0"))
    proxy = FrontendGeneration([f"127.0.0.1:{rank.port}"])
    frontend = serve_grpc("127.0.0.1", 0, lambda: None, proxy)
    servers = {"rank": rank, "frontend": frontend}
    channels = {name: grpc.insecure_channel(f"127.0.0.1:{server.port}") for name, server in servers.items()}
    try:
        yield Served(engine, steps, servers, channels)
    finally:
        for channel in channels.values():
            channel.close()
        proxy.close()
        for server in (frontend, rank):
            server.stop(0)
        engine.stop()
        dist.destroy_process_group()


def request(max_new_tokens: int, text: str = PROMPT, **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, **sampling))


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_unary_and_streamed_outputs_equal_the_engines_direct_one(served: Served, via: str) -> None:
    stub, max_tokens = GenerationStub(served.channels[via]), 20
    direct = served.engine.generate(TOKENIZER.encode(PROMPT), GenerateParams(max_new_tokens=max_tokens)).tokens
    expected = finish(direct, TOKENIZER.decode, TOKENIZER.eos_id, [])
    unary = stub.Generate(request(max_tokens), timeout=120)
    assert list(unary.token_ids) == direct and unary.text == expected.text
    assert unary.usage.prompt_tokens == len(TOKENIZER.encode(PROMPT))
    assert unary.usage.completion_tokens == len(direct) and unary.batch_size == 1
    messages = list(stub.GenerateStream(request(max_tokens), timeout=120))
    assert [t for m in messages for t in m.token_ids] == direct
    assert "".join(m.text for m in messages) == unary.text
    assert len(messages) == len(direct) + 1  # one per token, then the end
    assert [m.finish_reason for m in messages[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * len(direct)
    assert messages[-1].finish_reason == unary.finish_reason and messages[-1].usage == unary.usage
    by_ids = stub.Generate(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=TOKENIZER.encode(PROMPT)), sampling=request(max_tokens).sampling)
    )
    assert list(by_ids.token_ids) == direct
    sampled = [stub.Generate(request(8, temperature=0.8, seed=7)).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seeded request is reproducible


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_a_stop_sequence_ends_unary_and_stream_at_the_same_place(served: Served, via: str) -> None:
    stub = GenerationStub(served.channels[via])
    full = stub.Generate(request(20)).text
    stop = ascii_stop(full)
    unary = stub.Generate(request(20, stop=[stop]))
    streamed = list(stub.GenerateStream(request(20, stop=[stop])))
    assert unary.text == full[: full.find(stop)] == "".join(m.text for m in streamed)
    assert unary.finish_reason == streamed[-1].finish_reason == pb.FINISH_REASON_STOP
    assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids)


def health_status(channel: grpc.Channel, service: str) -> int:
    status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status
    return status


def test_health_follows_readiness_and_draining(served: Served) -> None:
    channel = served.channels["rank"]
    assert health_status(channel, "") == SERVING and health_status(channel, SERVICE) == SERVING
    served.engine.broken = "RuntimeError: a peer is gone"  # a seam: breaking a group needs two real ranks
    try:
        assert health_status(channel, SERVICE) == NOT_SERVING and health_status(channel, "") == SERVING
        with pytest.raises(grpc.RpcError) as refused:
            GenerationStub(channel).Generate(request(2))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "broken" in refused.value.details()
    finally:
        served.engine.broken = None
    assert health_status(channel, SERVICE) == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        health_status(channel, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    drained = serve_grpc("127.0.0.1", 0, lambda: None)  # a server of its own: draining is for good
    try:
        with grpc.insecure_channel(f"127.0.0.1:{drained.port}") as own:
            assert health_status(own, SERVICE) == SERVING
            drained.drain()
            assert health_status(own, SERVICE) == NOT_SERVING and health_status(own, "") == NOT_SERVING
    finally:
        drained.stop(0)


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_reflection_lists_the_services_and_describes_generation(served: Served, via: str) -> None:
    database = ProtoReflectionDescriptorDatabase(served.channels[via])
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        database.get_services()
    )
    described = database.FindFileContainingSymbol(SERVICE)
    methods = {m.name: m.server_streaming for m in described.service[0].method}
    assert methods == {
        "Generate": False,
        "GenerateStream": True,
        "Abort": False,
        "GetModelInfo": False,
        "GetLoad": False,
    }


@pytest.mark.parametrize("via", ["rank", "frontend"])
@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(text=""), "text"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1 << 30])), "token_ids.ids"),
        (request(100_000), "sampling.max_new_tokens"),
        (request(2, temperature=5.0), "sampling.temperature"),
        (request(2, temperature=float("nan")), "sampling.temperature"),
        (request(2, top_p=1.5), "sampling.top_p"),
        (request(2, stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
        (pb.GenerateRequest(text="p", request_id="x" * 300), "request_id"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    served: Served, via: str, bad: pb.GenerateRequest, field: str
) -> None:
    stub = GenerationStub(served.channels[via])
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as refused:
            call(bad, timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(field + ":"), refused.value.details()
    assert list(stub.Generate(request(2)).token_ids)  # the same server still serves


def test_bytes_that_are_no_request_get_an_error_status_and_the_server_goes_on(served: Served) -> None:
    raw = served.channels["rank"].unary_unary(f"/{SERVICE}/Generate")
    for junk in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"):  # corrupt, overlong, truncated
        with pytest.raises(grpc.RpcError) as refused:
            raw(junk, timeout=60)
        assert refused.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    assert list(GenerationStub(served.channels["rank"]).Generate(request(2)).token_ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=48))
def test_random_bytes_get_an_answer_or_an_error_status(served: Served, junk: bytes) -> None:
    sampling = pb.SamplingParams(max_new_tokens=2).SerializeToString()
    raw = served.channels["rank"].unary_unary(f"/{SERVICE}/Generate")
    try:  # random bytes with a short generation appended (a field may repeat: the last one wins)
        answer = pb.GenerateResponse.FromString(raw(junk + b"\x22" + bytes([len(sampling)]) + sampling, timeout=60))
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), error
    else:
        assert len(answer.token_ids) <= 2


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_a_deadline_is_honoured_and_a_full_queue_is_resource_exhausted(served: Served, via: str) -> None:
    engine, stub = served.engine, GenerationStub(served.channels[via])
    wait_for("an idle engine", lambda: engine.scheduler.in_batch == 0 and engine.scheduler.queued == 0)
    max_queue = engine.scheduler.max_queue
    engine.scheduler.max_queue = 1
    try:
        with engine._group_lock:  # the group is busy: batches wait
            first = stub.Generate.future(request(2), timeout=120)
            wait_for("the first request taken into a batch", lambda: engine.scheduler.in_batch == 1)
            late = stub.Generate.future(request(2), timeout=2.0)
            wait_for("a second request queued", lambda: engine.scheduler.queued == 1)
            with pytest.raises(grpc.RpcError) as full:
                stub.Generate(request(2), timeout=60)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in full.value.details()
            with pytest.raises(grpc.RpcError) as expired:
                late.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for("the expired request out of the queue", lambda: engine.scheduler.queued == 0)
        assert len(first.result().token_ids) == 2
    finally:
        engine.scheduler.max_queue = max_queue


def test_rpcs_past_the_servers_bound_are_resource_exhausted(served: Served) -> None:
    engine = served.engine
    bounded = serve_grpc("127.0.0.1", 0, lambda: engine.unready, RankGeneration(engine, 256, MODEL, "g"), max_rpcs=1)
    wait_for("an idle engine", lambda: engine.scheduler.in_batch == 0 and engine.scheduler.queued == 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bounded.port}") as channel:
            stub = GenerationStub(channel)
            with engine._group_lock:  # the group is busy: the first call holds the server's only RPC slot
                first = stub.Generate.future(request(2), timeout=120)
                wait_for("the first request taken into a batch", lambda: engine.scheduler.in_batch == 1)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.GetLoad(pb.LoadRequest(), timeout=60)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(first.result().token_ids) == 2
            assert stub.GetLoad(pb.LoadRequest(), timeout=60).groups[0].group == "g"  # the slot is free again
    finally:
        bounded.stop(0)


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_abort_takes_a_streamed_request_out_of_its_batch(served: Served, via: str) -> None:
    engine, stub, max_tokens = served.engine, GenerationStub(served.channels[via]), 64
    assert len(stub.Generate(request(max_tokens)).token_ids) == max_tokens  # uncancelled: 63 decoding steps
    wait_for("an idle engine", lambda: engine.scheduler.in_batch == 0)
    cancelled_before = engine.cancelled_requests
    served.steps.reset(1, lambda: engine.cancelled_requests > cancelled_before)
    call = stub.GenerateStream(pb.GenerateRequest(request_id="r-1", text=PROMPT, sampling=request(max_tokens).sampling))
    first = next(call)  # the first token is out; the next step is held until the request is cancelled
    assert len(first.token_ids) == 1
    assert stub.Abort(pb.AbortRequest(request_id="r-1")).found
    with pytest.raises(grpc.RpcError) as aborted:
        list(call)
    assert aborted.value.code() == grpc.StatusCode.CANCELLED
    assert served.steps.held_until is True and served.steps.sizes == [1]  # it left at the next step
    assert not stub.Abort(pb.AbortRequest(request_id="r-1")).found  # no longer in flight


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_model_info_and_load(served: Served, via: str) -> None:
    stub = GenerationStub(served.channels[via])
    info = stub.GetModelInfo(pb.ModelInfoRequest())
    config = served.engine.model.config
    assert (info.model, info.vocab_size, info.eos_token_id) == (MODEL, config.vocab_size, TOKENIZER.eos_id)
    assert info.max_new_tokens_limit == 256 and info.ranks_per_group == 1
    (group,) = stub.GetLoad(pb.LoadRequest()).groups
    assert group.group == "group-0" and group.ready and group.placement_generation == 0
    assert group.max_queue == served.engine.scheduler.max_queue
