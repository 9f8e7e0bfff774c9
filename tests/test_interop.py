"""What other tools see of a real server: reflection under both of its versions with the
repository's proto file name, and a second server refused on a port that is already taken."""
from __future__ import annotations

import subprocess
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as refl
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICES = {"lstmgen.v1.Generator", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"}


def test_reflection_v1alpha_with_the_repository_file_name(char_server):
    """grpcio-reflection's own client (v1alpha) rebuilds the service from the server alone."""
    with grpc.insecure_channel(char_server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert set(db.get_services()) == SERVICES
        assert db.FindFileContainingSymbol("lstmgen.v1.Generator").name == "lstmgen/v1/generator.proto"
        pool = descriptor_pool.DescriptorPool(db)
        gen = pool.FindServiceByName("lstmgen.v1.Generator")
        assert {m.name for m in gen.methods} == {"Generate", "GetModelInfo"}
        assert gen.methods_by_name["Generate"].output_type.full_name == "lstmgen.v1.GenerateResponse"
        assert pool.FindServiceByName("grpc.reflection.v1.ServerReflection").file.name == \
            "grpc/reflection/v1/reflection.proto"


def _v1(ch, *requests: refl.ServerReflectionRequest) -> list[refl.ServerReflectionResponse]:
    """grpc.reflection.v1 has v1alpha's messages and field numbers under another package name."""
    call = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                            request_serializer=refl.ServerReflectionRequest.SerializeToString,
                            response_deserializer=refl.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=10))


def test_reflection_v1_with_the_repository_file_name(char_server):
    with grpc.insecure_channel(char_server.target) as ch:
        listed, by_symbol, by_name = _v1(ch, refl.ServerReflectionRequest(list_services=""),
                                         refl.ServerReflectionRequest(file_containing_symbol="lstmgen.v1.Generator"),
                                         refl.ServerReflectionRequest(file_by_filename="lstmgen/v1/generator.proto"))
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    for resp in (by_symbol, by_name):
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in resp.file_descriptor_response.file_descriptor_proto]
        assert [f.name for f in files] == ["lstmgen/v1/generator.proto"]
        assert files[0].package == "lstmgen.v1" and files[0].service[0].name == "Generator"


def test_second_server_on_a_port_in_use_fails_naming_it(bundles, char_server):
    """gRPC's default SO_REUSEPORT let two servers share a port and split the new connections."""
    host, port = char_server.target.rsplit(":", 1)
    r = subprocess.run([sys.executable, "-m", "lstmgen.cli", "serve", str(bundles["char"]), "--host", host,
                        "--port", port, "--device", "cpu", "--threads", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "serving on" not in r.stdout
    assert f"cannot listen on {host}:{port}" in r.stderr and "in use" in r.stderr and "Traceback" not in r.stderr
    with grpc.insecure_channel(char_server.target) as ch:  # the first one still serves
        grpc.channel_ready_future(ch).result(timeout=10)
