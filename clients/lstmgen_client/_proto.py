"""Request building and response parsing shared by Client and AsyncClient."""
from __future__ import annotations

import json
from typing import Iterable

from lstmgen_client.types import Finished, GenerateResult, Limits, ModelInfo, StreamChunk
from lstmgen_client.v1 import generator_pb2 as pb

_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_END_OF_TEXT: "end_of_text",
}


def build_request(prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int = 0, top_p: float | None = None, seed: int | None = None, greedy: bool = False,
                  stop: Iterable[str] = (), skip_unknown: bool = False) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, top_k=top_k, greedy=greedy, stop=list(stop),
                             skip_unknown=skip_unknown)
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def parse_chunk(msg: pb.GenerateResponse) -> StreamChunk:
    finished = None
    if msg.HasField("finished"):
        f = msg.finished
        finished = Finished(_REASONS.get(f.reason, "unspecified"), f.prompt_tokens, f.generated_tokens,
                            f.seed, f.stop_sequence)
    return StreamChunk(msg.text, msg.token_count, finished)


class Collector:
    """Folds a stream of chunks into one GenerateResult."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.finished: Finished | None = None
        self.messages = 0

    def add(self, chunk: StreamChunk) -> None:
        self.parts.append(chunk.text)
        self.messages += 1
        self.finished = chunk.finished or self.finished

    def result(self) -> GenerateResult:
        if self.finished is None:
            raise RuntimeError("stream ended without a final message")
        return GenerateResult("".join(self.parts), self.finished, self.messages)


def parse_model_info(msg: pb.ModelInfo) -> ModelInfo:
    lim = msg.limits
    return ModelInfo(
        level=msg.level, vocab_size=msg.vocab_size, num_layers=msg.num_layers, hidden_size=msg.hidden_size,
        embedding_size=msg.embedding_size, quantization=msg.quantization,
        execution_provider=msg.execution_provider, model_sha256=msg.model_sha256,
        has_prompt_graph=msg.has_prompt_graph,
        limits=Limits(lim.max_prompt_chars, lim.max_new_tokens, lim.default_new_tokens, lim.max_stop_sequences,
                      lim.max_stop_sequence_chars, lim.max_concurrent_streams, lim.max_queued_streams,
                      lim.max_request_bytes),
        provenance=json.loads(msg.provenance_json) if msg.provenance_json else {},
        vocabulary=tuple(msg.vocabulary))
