"""Server reflection under both of its names: `grpc.reflection.v1`, which current tools ask first,
and `grpc.reflection.v1alpha`, which older ones know. grpcio-reflection implements only v1alpha;
v1 has the same messages with the same field numbers in another package, so one servicer answers
both.

The servicer reads a private descriptor pool: our files plus a v1 copy of the reflection file, so
a client can describe every service listed, and protobuf's process-wide pool is left alone.
"""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
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
    servicer = reflection.aio.ReflectionServicer((*service_names, V1, V1ALPHA), pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=v1alpha.ServerReflectionRequest.FromString,
        response_serializer=v1alpha.ServerReflectionResponse.SerializeToString)
    for name in (V1, V1ALPHA):
        methods = {"ServerReflectionInfo": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))


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
