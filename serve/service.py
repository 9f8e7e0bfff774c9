"""The gRPC edge: protobuf <-> plain dataclasses, and the one place errors become statuses."""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import grpc

from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded, StepFailed, Unavailable
from lstmgen.serve.params import GenerationRequest, SamplingParams
from lstmgen.serve.scheduler import Chunk, Scheduler
from lstmgen.serve.stopping import FinishReason
from lstmgen_client.v1 import generator_pb2 as pb
from lstmgen_client.v1 import generator_pb2_grpc as pb_grpc

log = logging.getLogger("lstmgen.service")

_STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    StepFailed: grpc.StatusCode.INTERNAL,
}
_REASON = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.END_OF_TEXT: pb.FINISH_REASON_END_OF_TEXT,
}


def status_for(error: Exception) -> grpc.StatusCode:
    return _STATUS.get(type(error), grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class ServiceConfig:
    # Messages per second the server aims to send in all; with many active streams each stream
    # waits active/budget seconds between messages, and the tokens made meanwhile ride together.
    message_budget_per_s: float = 4000.0


def request_from_pb(msg: pb.GenerateRequest) -> GenerationRequest:
    def opt(name: str, default):
        return getattr(msg, name) if msg.HasField(name) else default

    temperature = opt("temperature", 1.0)
    top_p = opt("top_p", 1.0)
    sampling = SamplingParams(temperature=temperature, top_k=msg.top_k, top_p=top_p,
                              greedy=msg.greedy, seed=opt("seed", 0))
    return GenerationRequest(prompt=msg.prompt, max_new_tokens=opt("max_new_tokens", None),
                             sampling=sampling, seed_given=msg.HasField("seed"),
                             stop=tuple(msg.stop), skip_unknown=msg.skip_unknown)


def chunk_to_pb(chunk: Chunk) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(text=chunk.text, token_count=chunk.token_count)
    f = chunk.finished
    if f is not None:
        resp.finished.CopyFrom(pb.Finished(reason=_REASON[f.reason], prompt_tokens=f.prompt_tokens,
                                           generated_tokens=f.generated_tokens, seed=f.seed,
                                           stop_sequence=f.stop_sequence))
    return resp


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, scheduler: Scheduler, cfg: ServiceConfig = ServiceConfig()):
        self.scheduler = scheduler
        self.cfg = cfg

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        stream = None
        try:
            stream = self.scheduler.submit(request_from_pb(request))
            async for chunk in stream:
                yield chunk_to_pb(chunk)
                if chunk.finished is None:
                    await self._pace()
        except GenerationError as e:
            code = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("request failed: %s", e)
            await context.abort(code, str(e))
        finally:
            if stream is not None:
                stream.cancel()  # no-op once finished; frees the row if the client went away

    async def _pace(self) -> None:
        """Let tokens pile up between messages when many streams are active."""
        wait = self.scheduler.stats().active_rows / self.cfg.message_budget_per_s
        if wait > 0.001:
            await asyncio.sleep(wait)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        s = self.scheduler
        m, lim = s.engine.manifest, s.limits
        return pb.ModelInfo(
            level=m.level, vocab_size=m.vocab_size, num_layers=m.num_layers, hidden_size=m.hidden_size,
            embedding_size=m.embedding_size, quantization=m.quantization,
            execution_provider=s.engine.provider, model_sha256=m.model_sha256,
            has_prompt_graph=s.engine.prompt_session is not None,
            provenance_json=json.dumps(m.provenance, sort_keys=True),
            vocabulary=list(m.vocab.tokens) if request.include_vocabulary else [],
            limits=pb.Limits(
                max_prompt_chars=lim.max_prompt_chars, max_new_tokens=lim.max_new_tokens,
                default_new_tokens=lim.default_new_tokens, max_stop_sequences=lim.max_stop_sequences,
                max_stop_sequence_chars=lim.max_stop_sequence_chars,
                max_concurrent_streams=lim.max_concurrent_streams,
                max_queued_streams=lim.max_queued_streams))
