"""Server reflection under both of its names: `grpc.reflection.v1`, which current tools ask first,
and `grpc.reflection.v1alpha`, which older ones know. grpcio-reflection implements only v1alpha;
v1 has the same messages with the same field numbers in another package, so one servicer answers
both.

The servicer reads a private descriptor pool: our files plus a v1 copy of the reflection file, so
a client can describe every service listed, and protobuf's process-wide pool is left alone.

A descriptor pool finds the file of a message, field, enum, service or extension, but not of a
method (`lstmgen.v1.Generator.Generate`) nor of an enum value under its enum's name
(`lstmgen.v1.FinishReason.FINISH_REASON_LENGTH`, as some tools write it; protobuf scopes enum
values beside their enum), an open grpcio-reflection bug: `grpcurl describe` of a method then fails with
"Symbol not found". So `file_containing_symbol` is answered from an index of every symbol in our
files, each mapped to its file, and only what the index lacks goes to the pool.
"""
from __future__ import annotations

from typing import AsyncIterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FileDescriptor
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1ALPHA = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...],
                      files: tuple[FileDescriptor, ...]) -> None:
    """Serve reflection for `service_names` (and itself), described from `files`."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for f in (*files, v1alpha.DESCRIPTOR):
        _add(pool, f, added)
    pool.Add(_v1_file())
    symbols: dict[str, str] = {}
    for name in (*added, "grpc/reflection/v1/reflection.proto"):
        symbols.update(symbol_files(pool.FindFileByName(name)))
    servicer = _Servicer(reflection.aio.ReflectionServicer((*service_names, V1, V1ALPHA), pool=pool), symbols)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString)
    for name in (V1, V1ALPHA):
        methods = {"ServerReflectionInfo": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))


class _Servicer:
    """grpcio-reflection's servicer, with `file_containing_symbol` answered from the symbol index: a
    symbol it holds is asked of the upstream servicer as its file's name (the answer, the file and
    its dependencies, then names the request the client sent)."""

    def __init__(self, upstream: reflection.aio.ReflectionServicer, symbols: dict[str, str]):
        self._upstream = upstream
        self._symbols = symbols

    async def ServerReflectionInfo(self, requests: AsyncIterator[v1alpha.ServerReflectionRequest], context):
        async for request in requests:
            asked = request
            file = self._symbols.get(request.file_containing_symbol) if request.HasField(
                "file_containing_symbol") else None
            if file is not None:
                asked = v1alpha.ServerReflectionRequest(host=request.host, file_by_filename=file)
            async for response in self._upstream.ServerReflectionInfo(_one(asked), context):
                response.original_request.CopyFrom(request)
                yield response


async def _one(request):
    yield request


def symbol_files(f: FileDescriptor) -> dict[str, str]:
    """Every symbol a reflection client may ask for, fully qualified, -> the name of `f`: services and
    their methods, messages (nested ones too) with their fields and oneofs, enums with their values
    (under both the enum's scope, as protobuf names them, and the enum's own name, as some tools do),
    extensions."""
    names = [*f.extensions_by_name.values()]
    for service in f.services_by_name.values():
        names += [service, *service.methods]
    todo: list[Descriptor] = list(f.message_types_by_name.values())
    enums = list(f.enum_types_by_name.values())
    while todo:
        message = todo.pop()
        names += [message, *message.fields, *message.oneofs, *message.extensions]
        todo += message.nested_types
        enums += message.enum_types
    out = {d.full_name: f.name for d in names}
    for enum in enums:
        out[enum.full_name] = f.name
        scope = enum.full_name.rpartition(".")[0]  # protobuf's name of a value: the enum's sibling
        for value in enum.values:
            out[f"{scope}.{value.name}" if scope else value.name] = out[f"{enum.full_name}.{value.name}"] = f.name
    return out


def _add(pool: descriptor_pool.DescriptorPool, f: FileDescriptor, added: set[str]) -> None:
    if f.name in added:
        return
    for dep in f.dependencies:  # a pool takes a file only after the files it imports
        _add(pool, dep, added)
    proto = descriptor_pb2.FileDescriptorProto()
    f.CopyToProto(proto)
    pool.Add(proto)
    added.add(f.name)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, made from the v1alpha file by renaming its package."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's java_package and the like
    for message in proto.message_type:  # no nested types in this file
        for field in message.field:
            if field.type_name:  # setting it on a scalar field, even to "", breaks the file
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    return proto
