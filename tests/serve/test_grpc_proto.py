"""The checked-in generated messages (`generation_pb2.py`, `.pyi`) are what grpcio-tools makes of `generation.proto`
now: regenerate with the command in `GENERATE` when this fails."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

from k2_api.contract import GrpcServices

WORKERS = Path(__file__).resolve().parents[2] / "workers"
PROTO = Path("k2_workers/serve/proto/generation.proto")
GENERATE = f"python -m grpc_tools.protoc -Iworkers --python_out=workers --pyi_out=workers workers/{PROTO}"


def test_the_generated_messages_match_the_proto(tmp_path: Path) -> None:
    status = protoc.main(
        ["protoc", f"-I{WORKERS}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", str(WORKERS / PROTO)]
    )
    assert status == 0
    for suffix in ("_pb2.py", "_pb2.pyi"):
        name = PROTO.with_name(PROTO.stem + suffix)
        assert (tmp_path / name).read_text() == (WORKERS / name).read_text(), f"{name} drifted: run {GENERATE}"


def test_the_service_name_in_the_contract_is_the_protos() -> None:
    from k2_workers.serve.proto import generation_pb2

    (service,) = generation_pb2.DESCRIPTOR.services_by_name.values()
    assert service.full_name == GrpcServices.GENERATION
