"""gRPC against real processes (`k2 worker serve`): a one-rank group and a frontend before it, each serving gRPC on
its own port beside HTTP. Health is SERVING on both, reflection lists the service, and greedy output through gRPC
(unary and streamed, rank and frontend) equals /v1/generate's and the OpenAI stream's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from k2_workers.serve.grpc_api import SERVICE, GenerationStub
from k2_workers.serve.proto import generation_pb2 as pb
from tests.serve.test_serving_worker import manifest
from tests.serve.worker_process import request, serve_processes, wait_healthy
from tests.support.ports import free_port

PROMPT = "The expert placement is a Kubernetes object"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """HTTP base URLs and gRPC targets of the rank and the frontend."""
    tmp_path: Path = tmp_path_factory.mktemp("grpc")
    rank_port, rank_grpc, frontend_port, frontend_grpc = (free_port() for _ in range(4))
    rank = f"http://127.0.0.1:{rank_port}"
    argv = [
        ["--config", str(manifest(tmp_path, 1, 0)), "--port", str(rank_port), "--metrics-port", "-1"],
        ["--frontend", "--endpoints", rank, "--port", str(frontend_port)],
    ]
    argv[0] += ["--grpc-port", str(rank_grpc)]
    argv[1] += ["--grpc-port", str(frontend_grpc), "--grpc-endpoints", f"127.0.0.1:{rank_grpc}"]
    with serve_processes(argv, [{"RANK": "0", "WORLD_SIZE": "1"}, {}]) as (worker, frontend):
        wait_healthy(rank, worker)
        wait_healthy(f"http://127.0.0.1:{frontend_port}", frontend)
        yield {
            "rank-http": rank,
            "frontend-http": f"http://127.0.0.1:{frontend_port}",
            "rank": f"127.0.0.1:{rank_grpc}",
            "frontend": f"127.0.0.1:{frontend_grpc}",
        }


@pytest.mark.parametrize("via", ["rank", "frontend"])
def test_grpc_serves_beside_http_and_agrees_with_it(targets: dict[str, str], via: str) -> None:
    status, body = request(targets["rank-http"] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": MAX_TOKENS})
    assert status == 200, body
    with grpc.insecure_channel(targets[via]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()
        stub = GenerationStub(channel)
        generate = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_new_tokens=MAX_TOKENS))
        unary = stub.Generate(generate, timeout=120)
        streamed = list(stub.GenerateStream(generate, timeout=120))
    assert list(unary.token_ids) == body["tokens"] == [t for m in streamed for t in m.token_ids]
    assert unary.text == "".join(m.text for m in streamed)
    api = openai.OpenAI(base_url=targets[f"{via}-http"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = api.completions.create(
        model="k2-debug-serve", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == unary.text
