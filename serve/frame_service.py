"""The gRPC edge of frame models: FrameModel.StreamFrames, and the Generator service's answers for a
frame model (GetModelInfo; Generate is FAILED_PRECONDITION). Protobuf stays here."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc

from lstmgen.serve.errors import GenerationError, InvalidRequest, WrongModel
from lstmgen.serve.frame_stream import FrameOutput, FrameStream
from lstmgen.serve.frame_scheduler import FrameScheduler
from lstmgen.serve.service import REQUEST_ID_KEY, _abort_gone, _lenient, _not_a_message, request_id, status_for
from lstmgen.serve.state_blob import StateCodec
from lstmgen_client.v1 import generator_pb2 as pb

log = logging.getLogger("lstmgen.frames.service")
_END = object()  # the client half-closed (a message that does not parse arrives as None)


def frame_model_info(engine, frame_limits, limits, codec: StateCodec) -> pb.ModelInfo:
    """GetModelInfo's answer for a frame model (fixed for the server's life)."""
    m, spec = engine.manifest, engine.manifest.frames
    return pb.ModelInfo(
        kind="frames", cell=m.cell, level="frames", task=spec.task, input_size=spec.input_size,
        output_size=spec.output_size, class_names=list(spec.class_names),
        standardize=(spec.standardize or {}).get("mode", "none"), num_layers=m.num_layers,
        hidden_size=m.hidden_size, embedding_size=m.embedding_size, quantization=m.quantization,
        execution_provider=engine.provider, model_sha256=m.model_sha256,
        provenance_json=json.dumps(m.provenance, sort_keys=True),
        state_bytes=codec.state_bytes, state_signed=codec.key is not None,
        limits=pb.Limits(max_concurrent_streams=frame_limits.max_streams, max_request_bytes=limits.max_request_bytes,
                         max_frames_per_message=frame_limits.max_frames_per_message, max_state_bytes=codec.max_bytes))


class IdleWatch:
    """Ends the calling task's stream once its client has neither sent a message nor read an output
    for `timeout` seconds (0: never). One timer handle on the event loop per stream, no thread: it
    is re-armed when it fires, not on each message, so a busy stream costs a clock read per message."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last = self._loop.time()
        self._timer = self._loop.call_later(timeout, self._check) if timeout > 0 else None

    @property
    def message(self) -> str:
        return (f"the client neither sent a frame nor read an output for {self.timeout:g}s, the server's "
                f"--frame-idle-timeout; a paused source keeps its stream open by sending an empty FramesRequest")

    def touch(self) -> None:
        """The client sent a message or took an output."""
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        left = self._last + self.timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check)
            return
        self._timer = None
        self.expired = True
        self._task.cancel()  # wherever the handler waits (a read, the worker, a write the client holds)


def output_to_pb(out: FrameOutput, classify: bool) -> pb.FramesResponse:
    resp = pb.FramesResponse(frames=len(out.values), finished=out.finished, frames_total=out.frames_total)
    if len(out.values):
        resp.values.extend(out.values.reshape(-1).tolist())
        if classify:
            resp.classes.extend(out.values.argmax(axis=1).tolist())
    return resp


class FrameService:
    def __init__(self, scheduler: FrameScheduler, model_info: pb.ModelInfo, codec: StateCodec, metrics=None):
        self.scheduler = scheduler
        self.model_info = model_info
        self.codec = codec
        self.metrics = metrics  # serve/metrics.py: one status count per stream

    def add_to_server(self, server: grpc.aio.Server) -> None:
        frames = {"StreamFrames": grpc.stream_stream_rpc_method_handler(
            self.StreamFrames, request_deserializer=_lenient(pb.FramesRequest),
            response_serializer=pb.FramesResponse.SerializeToString)}
        info = {"GetModelInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo, request_deserializer=_lenient(pb.ModelInfoRequest),
                    response_serializer=pb.ModelInfo.SerializeToString),
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.Generate, request_deserializer=_lenient(pb.GenerateRequest),
                    response_serializer=pb.GenerateResponse.SerializeToString)}
        for service, handlers in (("FrameModel", frames), ("Generator", info)):
            name = pb.DESCRIPTOR.services_by_name[service].full_name
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
            server.add_registered_method_handlers(name, handlers)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        if request is None:
            e = _not_a_message(pb.ModelInfoRequest)
            await context.abort(status_for(e), str(e))
        return self.model_info

    async def Generate(self, request, context) -> None:
        e = WrongModel("model", "this server serves a frame model (kind \"frames\"); call FrameModel.StreamFrames")
        await _abort_gone(context, status_for(e), str(e))

    async def StreamFrames(self, requests, context) -> None:
        rid = request_id(context.invocation_metadata())
        t0 = time.perf_counter()
        stream: FrameStream | None = None
        reader: asyncio.Task | None = None
        status, frames = "CANCELLED", 0
        classify = self.scheduler.spec.task == "classification"
        idle = IdleWatch(self.scheduler.limits.idle_timeout_s)
        try:
            try:
                it = aiter(requests)
                first = await anext(it, _END)
                idle.touch()
                if first is _END:  # the client closed without a message: nothing to do
                    await context.write(pb.FramesResponse(finished=True))
                    status = "OK"
                    return
                if not isinstance(first, pb.FramesRequest):
                    raise _not_a_message(pb.FramesRequest)
                opts = first.options
                state = self.codec.decode_frames(opts.state) if opts.state else None
                stream = self.scheduler.open(final_only=opts.final_only, state=state)
                # Headers now, not with the first output: a status must not wait for a write that
                # the client holds (gRPC refuses the status while the headers ride on that write)
                await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
                reader = asyncio.create_task(self._read(first, it, stream, idle))
                while True:
                    out = self.scheduler.read(stream)
                    if out is None:
                        if stream.cancelled:  # the client's side broke: nobody to answer
                            break
                        await stream.wait_ready()
                        continue
                    frames = out.frames_total
                    if len(out.values) or out.finished:
                        resp = output_to_pb(out, classify)
                        if out.finished and opts.return_state:  # drained: the worker is done with its state
                            resp.state = self.codec.encode_frames(stream.state, out.frames_total)
                        await context.write(resp)  # waits while the client does not read (flow control)
                        idle.touch()
                    if out.finished:
                        break
                status = "OK"
            finally:
                idle.stop()  # the endings below may wait; nothing cancels them
        except asyncio.CancelledError:
            if not idle.expired:
                raise  # the client cancelled: grpc.aio's own path
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python 3.11+: that cancel was ours, and it is handled
                task.uncancel()
            # Returned, not aborted: grpc.aio sends the status once the handler is done, so the row
            # goes now even if the status waits behind outputs the client never read.
            status = "DEADLINE_EXCEEDED"
            context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            context.set_details(idle.message)
        except grpc.aio.InternalError:
            await _abort_gone(context, grpc.StatusCode.CANCELLED, "the client went away")
        except GenerationError as e:
            status = status_for(e).name
            await _abort_gone(context, status_for(e), str(e))
        except Exception as e:  # a bug: INTERNAL, one log line with the traceback, the server goes on
            log.exception("unexpected error request_id=%s", rid, extra={"request_id": rid})
            status = "INTERNAL"
            await _abort_gone(context, grpc.StatusCode.INTERNAL,
                              f"internal error ({type(e).__name__}); the server log has it under request_id={rid}")
        finally:
            if reader is not None:
                reader.cancel()
            if stream is not None:
                self.scheduler.release(stream)
            if self.metrics is not None:
                self.metrics.stream_ended(status)
            log.info("frame stream end request_id=%s status=%s frames=%d duration_ms=%.1f", rid, status, frames,
                     (time.perf_counter() - t0) * 1e3, extra={"request_id": rid})

    async def _read(self, first: pb.FramesRequest, requests, stream: FrameStream, idle: IdleWatch) -> None:
        """Feed the client's frames to the scheduler; a bad message fails the stream."""
        try:
            msg, seen = first, 0
            while True:
                if not isinstance(msg, pb.FramesRequest):
                    raise _not_a_message(pb.FramesRequest)
                x = self.scheduler.check_frames(msg.values, seen)
                seen += len(x)
                if len(x):
                    # the model is behind, or the client does not read its outputs: stop reading
                    # (gRPC flow control holds the client)
                    await stream.wait_room()
                    self.scheduler.feed(stream, x)
                msg = await anext(requests, _END)
                idle.touch()
                if msg is _END:
                    break
            self.scheduler.end_input(stream)
        except InvalidRequest as e:
            stream.fail(e)
            stream.wake()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client's side broke (cancelled, connection gone)
            log.debug("frame stream input ended: %r", e)
            stream.cancelled = True
            stream.wake()
