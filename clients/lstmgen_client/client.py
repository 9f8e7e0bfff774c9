"""`Client` (blocking) and `AsyncClient` (asyncio): generate, generate_stream, model_info.

Both share request building and response parsing (`_proto`), channel and metadata set-up (below)
and one error mapping (`errors`).

TLS: pass `root_certificates` (PEM bytes of the CA that signed the server's certificate) or
`tls=True` for the system's roots. Token auth: `token` is sent as `authorization: Bearer <token>`.
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


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def _metadata(token: str | None, request_id: str | None) -> tuple[tuple[str, str], ...] | None:
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if request_id:
        md.append(("x-request-id", request_id))  # the server logs under it and echoes it back
    return tuple(md) or None


class Client:
    """Blocking client. `timeout` (seconds) is each call's deadline; None waits forever."""

    def __init__(self, target: str, timeout: float | None = 60.0, channel: grpc.Channel | None = None, *,
                 tls: bool = False, root_certificates: bytes | None = None, token: str | None = None):
        self.timeout = timeout
        self._token = token
        creds = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.secure_channel(target, creds, options=_OPTIONS) if creds
                                    else grpc.insecure_channel(target, options=_OPTIONS))
        self._stub = pb_grpc.GeneratorStub(self._channel)

    def generate_stream(self, prompt: str, *, timeout: float | None = None, request_id: str | None = None,
                        **params) -> Iterator[StreamChunk]:
        call = self._stub.Generate(build_request(prompt, **params), timeout=timeout or self.timeout,
                                   metadata=_metadata(self._token, request_id))
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
                                          timeout=self.timeout, metadata=_metadata(self._token, None))
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

    def __init__(self, target: str, timeout: float | None = 60.0, channel: grpc.aio.Channel | None = None, *,
                 tls: bool = False, root_certificates: bytes | None = None, token: str | None = None):
        self.timeout = timeout
        self._token = token
        creds = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.aio.secure_channel(target, creds, options=_OPTIONS) if creds
                                    else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self._stub = pb_grpc.GeneratorStub(self._channel)

    async def generate_stream(self, prompt: str, *, timeout: float | None = None, request_id: str | None = None,
                              **params) -> AsyncIterator[StreamChunk]:
        call = self._stub.Generate(build_request(prompt, **params), timeout=timeout or self.timeout,
                                   metadata=_metadata(self._token, request_id))
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
                                                timeout=self.timeout, metadata=_metadata(self._token, None))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return parse_model_info(msg)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
