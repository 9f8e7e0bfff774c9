"""`Client` (blocking) and `AsyncClient` (asyncio): generate, generate_stream, model_info.

Both share request building and response parsing (`_proto`) and one error mapping (`errors`).
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator

import grpc

from lstmgen_client._proto import Collector, build_request, parse_chunk, parse_model_info
from lstmgen_client.errors import from_rpc_error
from lstmgen_client.types import GenerateResult, ModelInfo, StreamChunk
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class Client:
    """Blocking client. `timeout` (seconds) is each call's deadline; None waits forever."""

    def __init__(self, target: str, timeout: float | None = 60.0,
                 channel: grpc.Channel | None = None):
        self.timeout = timeout
        self._channel = channel or grpc.insecure_channel(target, options=_OPTIONS)
        self._stub = pb_grpc.GeneratorStub(self._channel)

    def generate_stream(self, prompt: str, *, timeout: float | None = None, **params) -> Iterator[StreamChunk]:
        call = self._stub.Generate(build_request(prompt, **params), timeout=timeout or self.timeout)
        try:
            for msg in call:
                yield parse_chunk(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # the caller stopped iterating early: free the server's row

    def generate(self, prompt: str, **params) -> GenerateResult:
        acc = Collector()
        for chunk in self.generate_stream(prompt, **params):
            acc.add(chunk)
        return acc.result()

    def model_info(self, include_vocabulary: bool = False) -> ModelInfo:
        try:
            msg = self._stub.GetModelInfo(pb.ModelInfoRequest(include_vocabulary=include_vocabulary),
                                          timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return parse_model_info(msg)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as `Client`, awaited."""

    def __init__(self, target: str, timeout: float | None = 60.0,
                 channel: grpc.aio.Channel | None = None):
        self.timeout = timeout
        self._channel = channel or grpc.aio.insecure_channel(target, options=_OPTIONS)
        self._stub = pb_grpc.GeneratorStub(self._channel)

    async def generate_stream(self, prompt: str, *, timeout: float | None = None,
                              **params) -> AsyncIterator[StreamChunk]:
        call = self._stub.Generate(build_request(prompt, **params), timeout=timeout or self.timeout)
        try:
            async for msg in call:
                yield parse_chunk(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str, **params) -> GenerateResult:
        acc = Collector()
        async for chunk in self.generate_stream(prompt, **params):
            acc.add(chunk)
        return acc.result()

    async def model_info(self, include_vocabulary: bool = False) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(pb.ModelInfoRequest(include_vocabulary=include_vocabulary),
                                                timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return parse_model_info(msg)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
