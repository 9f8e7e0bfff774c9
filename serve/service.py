"""The gRPC edge: protobuf <-> plain dataclasses, and the one place errors become statuses.

Each Generate call gets a request id (the client's `x-request-id` metadata when it is a sane
token, else a fresh one), echoed in the initial and trailing metadata and carried by every log
line about the stream. One access line per stream: status, tokens, duration.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from lstmgen.config_args import option
from lstmgen.serve.errors import (GenerationError, InvalidRequest, Overloaded, StepFailed, Unauthenticated,
                                  Unavailable, WrongModel)
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.params import MIN_TEMPERATURE, GenerationRequest, SamplingParams
from lstmgen.serve.records import Delta
from lstmgen.serve.scheduler import Scheduler
from lstmgen.serve.stream import Stream
from lstmgen.serve.state_blob import StateCodec
from lstmgen.serve.stopping import FinishReason
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

log = logging.getLogger("lstmgen.service")

_STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    StepFailed: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
}
# Why a call was refused before it generated anything (lstmgen_rejections_total{reason}).
_REJECTION = {
    InvalidRequest: "invalid_argument",
    WrongModel: "failed_precondition",
    Overloaded: "overloaded",
    Unavailable: "shutting_down",
    Unauthenticated: "unauthenticated",
}
REQUEST_ID_KEY = "x-request-id"
# Client ids go into logs and metadata: a bounded, printable token or we make our own.
_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_REASON = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_OF_TEXT: pb.FINISH_REASON_END_OF_TEXT,
}


def _lookup(table: dict, error: Exception):
    # Through the class hierarchy: a subclass of InvalidRequest is still INVALID_ARGUMENT
    return next((table[cls] for cls in type(error).__mro__ if cls in table), None)


def status_for(error: Exception) -> grpc.StatusCode:
    return _lookup(_STATUS, error) or grpc.StatusCode.INTERNAL


def rejection_reason(error: Exception) -> str | None:
    return _lookup(_REJECTION, error)


def request_id(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SANE_ID.fullmatch(value):
            return value
    return secrets.token_hex(8)


def _lenient(message_cls):
    """Deserializer that yields None for bytes that are not a valid message (bad wire format,
    bad UTF-8 in a string field), so the handler can answer INVALID_ARGUMENT instead of gRPC's
    generic failure. Unknown fields are kept and ignored, as protobuf does."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return None
    return parse


def _not_a_message(cls) -> InvalidRequest:
    return InvalidRequest("request", f"is not a valid {cls.DESCRIPTOR.full_name} message "
                                     "(malformed protobuf or invalid UTF-8 in a string field)")


@dataclass(frozen=True)
class ServiceConfig:
    # Messages per second the server aims to send in all; with many active streams each stream
    # waits active/budget seconds between messages, and the tokens made meanwhile ride together.
    # 500: at 64 streams a message every 128 ms per stream (words arrive faster than anyone reads
    # them). Each message costs the event loop, gRPC and the client CPU that the model's threads
    # need on a small machine: 2,000/s held a word model at 64 streams to 73% of its raw step rate,
    # 500/s to 87% (docs/benchmark.md).
    message_budget_per_s: float = option(500.0, "messages per second aimed at across all streams; more active "
                                                "streams -> more tokens per message", flag="--message-budget")
    # Floor on the gap between one stream's messages after its first: a char model makes a token
    # every ~0.1-0.2 ms and a word model one every ~2 ms at batch 1, far faster than anyone reads,
    # and each message costs the server and the client more CPU than a model step. 16 ms (a 60 Hz
    # display's frame) lifted one stream by 11-14% on a word model and 55% on a char model over
    # 2 ms on 2 cores (docs/benchmark.md); a reader sees no difference. 0: send every token.
    min_message_interval_s: float = option(0.016, "least time between one stream's messages after its first "
                                                  "token (0: no floor)", flag="--min-message-interval-ms",
                                           scale=1000, metavar="MS")  # the flag in ms, the field in s


async def pace(scheduler: Scheduler, cfg: ServiceConfig, stream: Stream) -> None:
    """Let tokens pile up between one stream's messages when many streams are active (both edges,
    gRPC and HTTP, share the one budget rule); the stream's end cuts the wait short."""
    share = scheduler.stats().active_rows / cfg.message_budget_per_s
    wait = max(share if share > 0.001 else 0.0, cfg.min_message_interval_s)
    if wait > 0:
        await stream.rest(wait)


def request_from_pb(msg: pb.GenerateRequest, codec: StateCodec, request_id: str = "") -> GenerationRequest:
    """The request, its state blob decoded (and checked) here at the edge, as responses' are encoded."""
    def opt(name: str, default):
        return getattr(msg, name) if msg.HasField(name) else default

    sampling = SamplingParams(temperature=opt("temperature", 1.0), top_k=msg.top_k, top_p=opt("top_p", 1.0),
                              min_p=opt("min_p", 0.0), repetition_penalty=opt("repetition_penalty", 1.0),
                              frequency_penalty=msg.frequency_penalty, presence_penalty=msg.presence_penalty,
                              greedy=msg.greedy, seed=opt("seed", 0))
    return GenerationRequest(prompt=msg.prompt, max_new_tokens=opt("max_new_tokens", None),
                             sampling=sampling, seed_given=msg.HasField("seed"),
                             stop=tuple(msg.stop), skip_unknown=msg.skip_unknown, request_id=request_id,
                             logprobs=msg.logprobs, top_logprobs=msg.top_logprobs,
                             state=codec.decode(msg.state) if msg.state else None,
                             return_state=msg.return_state, state_every=msg.state_every,
                             logit_bias=tuple(sorted(msg.logit_bias.items())))


def delta_to_pb(delta: Delta, codec: StateCodec) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(text=delta.text, token_count=delta.token_count)
    f = delta.finished
    if f is not None:
        resp.finished.CopyFrom(pb.Finished(reason=_REASON[f.reason], prompt_tokens=f.prompt_tokens,
                                           generated_tokens=f.generated_tokens, seed=f.seed,
                                           stop_sequence=f.stop_sequence, held_text=f.held_text))
    if delta.state is not None:
        resp.state = codec.encode(delta.state)
    for lp in delta.logprobs:
        resp.logprobs.append(pb.TokenLogprob(
            token_id=lp.token_id, text=lp.text, logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, text=text, logprob=v) for t, text, v in lp.top]))
    return resp


async def _abort_gone(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """context.abort, for a call whose client may have left: core then fails the status write as
    well (grpc.aio.InternalError) and there is nobody to tell. The abort is recorded either way,
    so grpc.aio ends the call quietly once the handler returns."""
    try:
        await context.abort(code, details)
    except grpc.aio.InternalError:
        pass


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, scheduler: Scheduler, codec: StateCodec, cfg: ServiceConfig = ServiceConfig(),
                 metrics: Metrics | None = None):
        self.scheduler = scheduler
        self.codec = codec  # the state blob's codec lives at the edge: the core takes and gives GenerationState objects
        self.cfg = cfg
        self.metrics = metrics or Metrics()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """As the generated add_GeneratorServicer_to_server, with lenient request parsing."""
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=_lenient(pb.GenerateRequest),
                response_serializer=pb.GenerateResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest),
                response_serializer=pb.ModelInfo.SerializeToString),
        }
        name = pb.DESCRIPTOR.services_by_name["Generator"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
        frames = {"StreamFrames": grpc.stream_stream_rpc_method_handler(  # the wrong kind of model: say so
            self.StreamFrames, request_deserializer=_lenient(pb.FramesRequest),
            response_serializer=pb.FramesResponse.SerializeToString)}
        name = pb.DESCRIPTOR.services_by_name["FrameModel"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, frames),))

    async def StreamFrames(self, requests, context) -> None:
        e = WrongModel("model", "this server serves a text model (kind \"text\"); call Generator.Generate")
        await _abort_gone(context, status_for(e), str(e))

    async def Generate(self, request: pb.GenerateRequest | None, context: grpc.aio.ServicerContext) -> None:
        # A coroutine writing with context.write, not an async generator: a write that fails in
        # gRPC core (the client cancelled while HTTP/2 flow control held the write) then raises
        # here, where it is a cancel like any other, instead of inside grpc.aio, which logs it
        # as an ERROR with a traceback ("ExecuteBatchError raised in core by servicer method").
        rid = request_id(context.invocation_metadata())
        t0 = time.perf_counter()
        stream, status, tokens, error = None, "CANCELLED", 0, ""
        self.metrics.open_streams.inc()
        try:
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            if request is None:
                raise _not_a_message(pb.GenerateRequest)
            stream = self.scheduler.submit(request_from_pb(request, self.codec, rid))
            # Only once admitted: a rejection stays one cheap write (the id rides in the trailers).
            await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            async for delta in stream:
                if tokens == 0 and delta.token_count:
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                tokens += delta.token_count
                await context.write(delta_to_pb(delta, self.codec))
                if delta.finished is None:
                    await pace(self.scheduler, self.cfg, stream)
            status = "OK"
        except grpc.aio.InternalError:  # a send failed in core: the client is gone (status stays CANCELLED)
            await _abort_gone(context, grpc.StatusCode.CANCELLED, "the client went away")
        except asyncio.CancelledError:
            if self.scheduler.accepting:
                raise  # a client's cancel: grpc.aio's own path, which logs it at DEBUG
            # The server is stopping and gRPC cancels what the grace period left (a client that read
            # nothing, its write parked by flow control): end quietly, since re-raising here makes
            # grpc.aio log an ERROR with a traceback for a shutdown that went as documented.
            status, error = "UNAVAILABLE", "server stopped before this stream was read to its end"
        except Exception as e:  # a GenerationError's own status; anything else is a bug: INTERNAL
            code = status_for(e)
            status, error = code.name, str(e)
            if not isinstance(e, GenerationError):
                log.exception("unexpected error request_id=%s", rid, extra={"request_id": rid})
                error = f"internal error ({type(e).__name__}); the server log has it under request_id={rid}"
            elif stream is None and rejection_reason(e):
                self.metrics.rejected(rejection_reason(e))
            await _abort_gone(context, code, error)
        finally:
            if stream is not None:
                stream.cancel()  # no-op once finished; frees the row if the client went away
            left = context.time_remaining()  # None: the call had no deadline
            if status == "CANCELLED" and left is not None and left <= 0:
                status = "DEADLINE_EXCEEDED"
            self._ended(rid, status, tokens, time.perf_counter() - t0, error)

    def _ended(self, rid: str, status: str, tokens: int, seconds: float, error: str) -> None:
        """Once per stream: the open gauge, the status counter and the access log line."""
        self.metrics.open_streams.dec()
        self.metrics.stream_ended(status)
        level = logging.ERROR if status == "INTERNAL" else logging.INFO
        log.log(level, "stream end request_id=%s status=%s tokens=%d duration_ms=%.1f%s", rid, status, tokens,
                seconds * 1e3, f" error={error!r}" if error else "", extra={"request_id": rid})

    async def GetModelInfo(self, request: pb.ModelInfoRequest | None, context) -> pb.ModelInfo:
        if request is None:
            e = _not_a_message(pb.ModelInfoRequest)
            await context.abort(status_for(e), str(e))
        s = self.scheduler
        m, lim = s.engine.manifest, s.limits
        return pb.ModelInfo(
            kind=m.kind, cell=m.cell, level=m.level, vocab_size=m.vocab_size, num_layers=m.num_layers, hidden_size=m.hidden_size,
            embedding_size=m.embedding_size, quantization=m.quantization,
            execution_provider=s.engine.provider, model_sha256=m.model_sha256,
            has_prompt_graph=s.engine.prompt_session is not None,
            # an upper bound: the held-back text is shorter than the longest stop sequence allowed
            state_bytes=self.codec.state_bytes_bound(max(lim.max_stop_sequence_chars - 1, 0)),
            state_signed=self.codec.key is not None,
            provenance_json=json.dumps(m.provenance, sort_keys=True),
            vocabulary=list(m.vocab.tokens) if request.include_vocabulary else [],
            limits=pb.Limits(
                max_prompt_chars=lim.max_prompt_chars, max_new_tokens=lim.max_new_tokens,
                default_new_tokens=lim.default_new_tokens, max_stop_sequences=lim.max_stop_sequences,
                max_stop_sequence_chars=lim.max_stop_sequence_chars,
                max_concurrent_streams=lim.max_concurrent_streams,
                max_queued_streams=lim.max_queued_streams, max_request_bytes=lim.max_request_bytes,
                max_top_logprobs=lim.max_top_logprobs, min_temperature=MIN_TEMPERATURE,
                max_state_bytes=self.codec.max_bytes, max_request_output=lim.max_request_output,
                max_unread_output=lim.max_unread_output))
