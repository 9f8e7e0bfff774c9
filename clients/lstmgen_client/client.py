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

Replicas: `target` may be a list of addresses ("host:port"); calls are then spread over them by
gRPC's own `round_robin` policy (hostnames are resolved once, here). A single `dns:///name:port`
target with `load_balancing="round_robin"` spreads over every address the name resolves to (a
Kubernetes headless Service). State: `return_state=True` puts the model's state on the result
(`result.state`), `state=` continues from one, on any replica serving the same model.
`generate_stream(..., resume=True)` survives its replica's death (lstmgen_client.resume).
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import AsyncIterator, Iterator, Sequence

import grpc

from lstmgen_client._proto import (Collector, build_request, check_params, check_timeout, parse_chunk,
                                  parse_model_info)
from lstmgen_client.errors import FailedPreconditionError, LstmgenError, from_rpc_error
from lstmgen_client.frames import (AsyncFrameCall, FrameCall, async_requests, prepare, requests as frame_requests,
                                   stream_options)
from lstmgen_client.resume import DEFAULT_STATE_EVERY, Resumer, new_seed
from lstmgen_client.types import GenerateResult, ModelInfo, StreamChunk
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
_UNSET = object()  # a stream's deadline when none is passed: the client's stream_timeout


def _channel_target(target: str | Sequence[str], load_balancing: str | None) -> tuple[str, list]:
    """gRPC target and channel options for one address or a list of replicas."""
    options = [("grpc.lb_policy_name", load_balancing)] if load_balancing else []
    if isinstance(target, str):
        return target, options
    addrs = list(target)
    if not addrs or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addrs):
        raise _invalid_target(addrs)
    resolved = []
    for addr in addrs:
        host, _, port = addr.rpartition(":")
        try:
            info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise LstmgenError(f"cannot resolve {addr}: {e}") from None
        family, *_, sockaddr = info[0]
        resolved.append((family, sockaddr[0], port))
    families = {f for f, _, _ in resolved}
    if len(families) != 1:
        raise LstmgenError(f"addresses {addrs} mix IPv4 and IPv6; give one family")
    if families == {socket.AF_INET6}:
        joined = "ipv6:" + ",".join(f"[{ip}]:{port}" for _, ip, port in resolved)
    else:
        joined = "ipv4:" + ",".join(f"{ip}:{port}" for _, ip, port in resolved)
    hosts = {a.rpartition(":")[0] for a in addrs}
    if len(hosts) == 1:  # TLS checks the certificate against the name given, not the IP
        options.append(("grpc.ssl_target_name_override", hosts.pop().strip("[]")))
    return joined, [("grpc.lb_policy_name", load_balancing or "round_robin")] + options[1 if load_balancing else 0:]


def _invalid_target(addrs) -> LstmgenError:
    from lstmgen_client.errors import InvalidArgumentError
    return InvalidArgumentError(f"INVALID_ARGUMENT: target: expected \"host:port\" or a non-empty list of them, "
                                f"got {addrs!r:.80}")


def _frame_model(info: ModelInfo) -> ModelInfo:
    if info.kind != "frames":
        raise FailedPreconditionError(f"FAILED_PRECONDITION: the server serves a {info.kind} model; stream_frames "
                                      "needs a frame model (generate / generate_stream for text)")
    return info


def _left(end: float | None) -> float | None:
    """What is left of a whole stream's deadline for its next attempt."""
    return None if end is None else max(0.001, end - time.monotonic())


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


def _resumable_params(params: dict, default_new_tokens) -> dict:
    """A resumable stream needs to know its seed and length (to continue or redo it exactly) and
    asks for states along the way. A request that continues a state has its seed in the state."""
    p = dict(params)
    if p.get("seed") is None and p.get("state") is None:
        p["seed"] = new_seed()
    if p.get("max_new_tokens") is None:
        p["max_new_tokens"] = default_new_tokens()
    if not p.get("state_every"):
        n = p["max_new_tokens"]
        p["state_every"] = min(DEFAULT_STATE_EVERY, n) if isinstance(n, int) and n > 0 else DEFAULT_STATE_EVERY
    return p


class Client:
    """Blocking client; deadlines as in the module's docstring."""

    def __init__(self, target: str | Sequence[str], timeout: float | None = 60.0, channel: grpc.Channel | None = None,
                 *, tls: bool = False, root_certificates: bytes | None = None, token: str | None = None,
                 stream_timeout: float | None = _UNSET, load_balancing: str | None = None):
        self.timeout = check_timeout(timeout)
        self.stream_timeout = self.timeout if stream_timeout is _UNSET else check_timeout(stream_timeout,
                                                                                          "stream_timeout")
        self._token = token
        creds = _credentials(tls, root_certificates)
        if channel is None:
            target, options = _channel_target(target, load_balancing)
            channel = (grpc.secure_channel(target, creds, options=_OPTIONS + options) if creds
                       else grpc.insecure_channel(target, options=_OPTIONS + options))
        self._channel = channel
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self._frames_stub = pb_grpc.FrameModelStub(self._channel)
        self._info: ModelInfo | None = None

    def stream_frames(self, frames, *, final_only: bool = False, frames_per_message: int = 64,
                      standardize: str = "auto", state: bytes | None = None, return_state: bool = False,
                      timeout: float | None = _UNSET, request_id: str | None = None) -> FrameCall:
        """A frame model's outputs, one per frame, as they are computed. `frames`: a [T, D_in] array
        (numpy, or a list of lists) or any iterable of frames (a live source: each frame goes out as it
        comes; set frames_per_message=1 so none waits for the next). `final_only` (classification):
        only the last frame's output. standardize="auto" applies the model's per-sequence
        standardisation to a whole array here ("none": the frames are ready as they are).
        Returns a FrameCall: iterate it for FrameOutputs; with `return_state` its `.state` holds the
        stream's state at the end; `state=` continues from one, on any replica of the same model."""
        info = _frame_model(self._model())
        rows, as_numpy = prepare(frames, standardize, info.standardize, frames_per_message)
        deadline = self.stream_timeout if timeout is _UNSET else check_timeout(timeout)
        options = stream_options(final_only, state, return_state)
        return FrameCall(self._frames(frame_requests(rows, frames_per_message, options), deadline,
                                      _metadata(self._token, request_id), info), as_numpy)

    def _frames(self, reqs, deadline, metadata, info: ModelInfo):
        call = self._frames_stub.StreamFrames(reqs, timeout=deadline, metadata=metadata)
        try:
            for msg in call:
                yield msg, info.output_size, info.class_names
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def _model(self) -> ModelInfo:
        if self._info is None:
            self._info = self.model_info()
        return self._info

    def generate_stream(self, prompt: str, *, timeout: float | None = _UNSET, request_id: str | None = None,
                        resume: bool = False, max_resumes: int = Resumer.MAX, **params) -> Iterator[StreamChunk]:
        """Chunks as they arrive. Checks the arguments now; the call starts on the first iteration.

        `resume=True`: if the stream breaks (its server dies, the connection drops), continue from
        the last state the server sent (every `state_every` tokens, 32 unless given) on whichever
        replica the channel reaches, up to `max_resumes` times; the chunks the caller gets are
        exactly those of an unbroken stream. Without a seed one is picked here."""
        if resume:
            params = _resumable_params(params, self._default_tokens)
        request, deadline = _prepare(prompt, params, timeout, self.stream_timeout)
        md = _metadata(self._token, request_id)
        if resume:
            return self._resuming(Resumer(request, request.max_new_tokens, max_resumes), deadline, md)
        return self._stream(request, deadline, md)

    def _default_tokens(self) -> int:
        return self._model().limits.default_new_tokens

    def _resuming(self, r: Resumer, deadline: float | None, metadata) -> Iterator[StreamChunk]:
        end = None if deadline is None else time.monotonic() + deadline
        request = r.first
        while True:
            call = self._stub.Generate(request, timeout=_left(end), metadata=metadata)
            try:
                for msg in call:
                    chunk = r.filter(parse_chunk(msg))
                    if chunk is not None:
                        yield chunk
                return
            except grpc.RpcError as e:
                if not r.resume_after(from_rpc_error(e)):  # raises what cannot be resumed
                    return
            finally:
                call.cancel()
            time.sleep(r.backoff())
            request = r.next_request()

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
        stream = self.generate_stream(prompt, **params)
        for chunk in stream:
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

    def __init__(self, target: str | Sequence[str], timeout: float | None = 60.0,
                 channel: grpc.aio.Channel | None = None, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, stream_timeout: float | None = _UNSET, load_balancing: str | None = None):
        self.timeout = check_timeout(timeout)
        self.stream_timeout = self.timeout if stream_timeout is _UNSET else check_timeout(stream_timeout,
                                                                                          "stream_timeout")
        self._token = token
        creds = _credentials(tls, root_certificates)
        if channel is None:
            target, options = _channel_target(target, load_balancing)
            channel = (grpc.aio.secure_channel(target, creds, options=_OPTIONS + options) if creds
                       else grpc.aio.insecure_channel(target, options=_OPTIONS + options))
        self._channel = channel
        self._stub = pb_grpc.GeneratorStub(self._channel)
        self._frames_stub = pb_grpc.FrameModelStub(self._channel)
        self._info: ModelInfo | None = None

    def stream_frames(self, frames, *, final_only: bool = False, frames_per_message: int = 64,
                      standardize: str = "auto", state: bytes | None = None, return_state: bool = False,
                      timeout: float | None = _UNSET, request_id: str | None = None) -> AsyncFrameCall:
        """As Client.stream_frames, `async for`; `frames` may also be an async iterable (a live source)."""
        as_numpy = type(frames).__module__ == "numpy"
        return AsyncFrameCall(self._frames(frames, final_only, frames_per_message, standardize, state, return_state,
                                           timeout, request_id), as_numpy)

    async def _frames(self, frames, final_only, frames_per_message, standardize, state, return_state, timeout,
                      request_id):
        if self._info is None:
            self._info = await self.model_info()
        info = _frame_model(self._info)
        deadline = self.stream_timeout if timeout is _UNSET else check_timeout(timeout)
        options = stream_options(final_only, state, return_state)
        if hasattr(frames, "__aiter__"):
            prepare([], standardize, info.standardize, frames_per_message)  # checks the arguments
            if info.standardize == "sequence" and standardize == "auto":
                prepare(iter(()), standardize, info.standardize)  # raises: a live source cannot be standardised
            reqs = async_requests(frames, frames_per_message, options)
        else:
            rows, _ = prepare(frames, standardize, info.standardize, frames_per_message)
            reqs = frame_requests(rows, frames_per_message, options)
        call = self._frames_stub.StreamFrames(reqs, timeout=deadline, metadata=_metadata(self._token, request_id))
        try:
            async for msg in call:
                yield msg, info.output_size, info.class_names
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def generate_stream(self, prompt: str, *, timeout: float | None = _UNSET, request_id: str | None = None,
                        resume: bool = False, max_resumes: int = Resumer.MAX, **params) -> AsyncIterator[StreamChunk]:
        """`async for` the chunks. Checks the arguments now; the call starts on the first iteration.
        `resume=True` as in Client.generate_stream (without max_new_tokens, the first iteration asks the
        server for its default)."""
        md = _metadata(self._token, request_id)
        if resume:
            params = _resumable_params(params, lambda: None)  # unset: _resuming asks the server
            request, deadline = _prepare(prompt, params, timeout, self.stream_timeout)
            return self._resuming(request, max_resumes, deadline, md)
        request, deadline = _prepare(prompt, params, timeout, self.stream_timeout)
        return self._stream(request, deadline, md)

    async def _resuming(self, request: pb.GenerateRequest, max_resumes: int, deadline: float | None,
                        metadata) -> AsyncIterator[StreamChunk]:
        end = None if deadline is None else time.monotonic() + deadline
        if not request.HasField("max_new_tokens"):
            if self._info is None:
                self._info = await self.model_info()
            request.max_new_tokens = self._info.limits.default_new_tokens
        r = Resumer(request, request.max_new_tokens, max_resumes)
        while True:
            call = self._stub.Generate(request, timeout=_left(end), metadata=metadata)
            try:
                async for msg in call:
                    chunk = r.filter(parse_chunk(msg))
                    if chunk is not None:
                        yield chunk
                return
            except grpc.RpcError as e:
                if not r.resume_after(from_rpc_error(e)):  # raises what cannot be resumed
                    return
            finally:
                call.cancel()
            await asyncio.sleep(r.backoff())
            request = r.next_request()

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
