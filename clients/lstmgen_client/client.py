"""`Client` (blocking) and `AsyncClient` (asyncio): generate, generate_stream, model_info.

Both share request building and response parsing (`_proto`), channel and metadata set-up (below)
and one error mapping (`errors`).

TLS: pass `root_certificates` (PEM bytes of the CA that signed the server's certificate) or
`tls=True` for the system's roots. Token auth: `token` is sent as `authorization: Bearer <token>`.

Deadlines: `timeout` bounds each short call (model_info). A stream's deadline covers the WHOLE
stream, from the request to the last token, so a long generation needs a long one: it is
`stream_timeout` (unset: the same as `timeout`), or a `timeout=` passed to that one call. A
deadline is a number of seconds > 0, or None for none; 0 or less raises InvalidArgumentError.

Arguments a request cannot carry (an empty prompt, a seed outside 0..2^64-1, an integer field
outside its protobuf type) raise InvalidArgumentError when generate / generate_stream is called,
before any call is made; everything else is checked by the server, against its own limits.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator

import grpc

from lstmgen_client._proto import (Collector, build_request, check_params, check_timeout, parse_chunk,
                                  parse_model_info)
from lstmgen_client.errors import from_rpc_error
from lstmgen_client.types import GenerateResult, ModelInfo, StreamChunk
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_UNSET = object()  # a stream's deadline when none is passed: the client's stream_timeout


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


def _prepare(prompt: str, params: dict, timeout, stream_timeout: float | None) \
        -> tuple[pb.GenerateRequest, float | None]:
    deadline = stream_timeout if timeout is _UNSET else check_timeout(timeout)
    return build_request(prompt, **check_params(prompt, params)), deadline


class Client:
    """Blocking client; deadlines as in the module's docstring."""

    def __init__(self, target: str, timeout: float | None = 60.0, channel: grpc.Channel | None = None, *,
                 tls: bool = False, root_certificates: bytes | None = None, token: str | None = None,
                 stream_timeout: float | None = _UNSET):
        self.timeout = check_timeout(timeout)
        self.stream_timeout = self.timeout if stream_timeout is _UNSET else check_timeout(stream_timeout,
                                                                                          "stream_timeout")
        self._token = token
        creds = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.secure_channel(target, creds, options=_OPTIONS) if creds
                                    else grpc.insecure_channel(target, options=_OPTIONS))
        self._stub = pb_grpc.GeneratorStub(self._channel)

    def generate_stream(self, prompt: str, *, timeout: float | None = _UNSET, request_id: str | None = None,
                        **params) -> Iterator[StreamChunk]:
        """Chunks as they arrive. Checks the arguments now; the call starts on the first iteration."""
        request, deadline = _prepare(prompt, params, timeout, self.stream_timeout)
        return self._stream(request, deadline, _metadata(self._token, request_id))

    def _stream(self, request: pb.GenerateRequest, deadline: float | None, metadata) -> Iterator[StreamChunk]:
        call = self._stub.Generate(request, timeout=deadline, metadata=metadata)
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
                 tls: bool = False, root_certificates: bytes | None = None, token: str | None = None,
                 stream_timeout: float | None = _UNSET):
        self.timeout = check_timeout(timeout)
        self.stream_timeout = self.timeout if stream_timeout is _UNSET else check_timeout(stream_timeout,
                                                                                          "stream_timeout")
        self._token = token
        creds = _credentials(tls, root_certificates)
        self._channel = channel or (grpc.aio.secure_channel(target, creds, options=_OPTIONS) if creds
                                    else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self._stub = pb_grpc.GeneratorStub(self._channel)

    def generate_stream(self, prompt: str, *, timeout: float | None = _UNSET, request_id: str | None = None,
                        **params) -> AsyncIterator[StreamChunk]:
        """`async for` the chunks. Checks the arguments now; the call starts on the first iteration."""
        request, deadline = _prepare(prompt, params, timeout, self.stream_timeout)
        return self._stream(request, deadline, _metadata(self._token, request_id))

    async def _stream(self, request: pb.GenerateRequest, deadline: float | None,
                      metadata) -> AsyncIterator[StreamChunk]:
        call = self._stub.Generate(request, timeout=deadline, metadata=metadata)
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
