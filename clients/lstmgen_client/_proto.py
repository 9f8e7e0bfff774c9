"""Request building and response parsing shared by Client and AsyncClient."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from lstmgen_client.errors import InvalidArgumentError
from lstmgen_client.types import (Finished, GenerateResult, ServerLimits, ModelInfo, StreamChunk, TokenLogprob,
                                  TopLogprob)
from lstmgen_client.v1 import generator_pb2 as pb

_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_END_OF_TEXT: "end_of_text",
}


def build_request(prompt: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int = 0, top_p: float | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, seed: int | None = None, greedy: bool = False,
                  stop: Iterable[str] = (), skip_unknown: bool = False, logprobs: bool = False,
                  top_logprobs: int = 0, state: bytes | None = None, return_state: bool = False,
                  state_every: int = 0, logit_bias: dict[int, float] | None = None) -> pb.GenerateRequest:
    """The request message; unset optional fields take the server's defaults (see the .proto).
    `logit_bias`: token id (ModelInfo.vocabulary's order) -> a value in [-100, 100] added to its logit."""
    req = pb.GenerateRequest(prompt=prompt, top_k=top_k, greedy=greedy, stop=list(stop),
                             skip_unknown=skip_unknown, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, logprobs=logprobs or top_logprobs > 0,
                             top_logprobs=top_logprobs, state=state or b"", return_state=return_state,
                             state_every=state_every, logit_bias=logit_bias or {})
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("min_p", min_p), ("repetition_penalty", repetition_penalty), ("seed", seed)):
        if value is not None:
            setattr(req, name, value)
    return req


def parse_chunk(msg: pb.GenerateResponse) -> StreamChunk:
    finished = None
    if msg.HasField("finished"):
        f = msg.finished
        finished = Finished(_REASONS.get(f.reason, "unspecified"), f.prompt_tokens, f.generated_tokens,
                            f.seed, f.stop_sequence, f.held_text)
    logprobs = tuple(TokenLogprob(lp.token_id, lp.text, lp.logprob,
                                  tuple(TopLogprob(t.token_id, t.text, t.logprob) for t in lp.top))
                     for lp in msg.logprobs)
    return StreamChunk(msg.text, msg.token_count, finished, logprobs, msg.state or None)


class Collector:
    """Folds a stream of chunks into one GenerateResult."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finished: Finished | None = None
        self.state: bytes | None = None
        self.messages = 0

    def add(self, chunk: StreamChunk) -> None:
        self.parts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        self.messages += 1
        self.finished = chunk.finished or self.finished
        if chunk.finished is not None:
            self.state = chunk.state  # the final state, or None without return_state

    def result(self) -> GenerateResult:
        if self.finished is None:
            raise RuntimeError("stream ended without a final message")
        return GenerateResult("".join(self.parts), self.finished, self.messages, tuple(self.logprobs),
                              self.state)


def parse_model_info(msg: pb.ModelInfo) -> ModelInfo:
    lim = msg.limits
    return ModelInfo(
        level=msg.level, vocab_size=msg.vocab_size, num_layers=msg.num_layers, hidden_size=msg.hidden_size,
        embedding_size=msg.embedding_size, quantization=msg.quantization,
        execution_provider=msg.execution_provider, model_sha256=msg.model_sha256,
        has_prompt_graph=msg.has_prompt_graph,
        limits=ServerLimits(**{f.name: getattr(lim, f.name) for f in dataclasses.fields(ServerLimits)}),  # same names
        provenance=json.loads(msg.provenance_json) if msg.provenance_json else {},
        vocabulary=tuple(msg.vocabulary), state_bytes=msg.state_bytes, state_signed=msg.state_signed,
        kind=msg.kind or "text", cell=msg.cell or "lstm", task=msg.task, input_size=msg.input_size,
        output_size=msg.output_size, class_names=tuple(msg.class_names), standardize=msg.standardize)


_INT32, _UINT32, _UINT64 = (-2**31, 2**31 - 1), (0, 2**32 - 1), (0, 2**64 - 1)
# Integer request fields: the range their protobuf type carries (what the client refuses outside of),
# and the part of it the field means, which the refusal names. A value the wire carries goes to the
# server, whose own limits decide (ModelInfo.limits): max_new_tokens=0 is the server's to refuse.
_WIRE_INTS = {"max_new_tokens": (_INT32, (1, 2**31 - 1), ""), "top_k": (_INT32, (0, 2**31 - 1), " (0 = off)"),
              "seed": (_UINT64, _UINT64, ""), "top_logprobs": (_UINT32, _UINT32, ""),
              "state_every": (_UINT32, (0, 2**31 - 1), " (0 = off)")}  # past max_new_tokens it means nothing


def _invalid(message: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"INVALID_ARGUMENT: {message}")  # worded as the server's refusals


def check_params(prompt: str, params: dict) -> dict:
    """What a request cannot be sent as, raised as InvalidArgumentError before any call is made
    (protobuf would raise a bare ValueError or TypeError); returns params for build_request with a
    single stop string (`stop="\\n\\n"`) taken as one sequence, not as its characters."""
    state = params.get("state")
    if state is not None and not isinstance(state, (bytes, bytearray)):
        raise _invalid(f"state: must be the bytes a server returned (result.state), got {type(state).__name__}")
    if not isinstance(prompt, str) or not (prompt or state):
        raise _invalid(f"prompt: must be a non-empty string (or empty with a state), got {prompt!r:.40}")
    for name, ((lo, hi), (meant_lo, meant_hi), note) in _WIRE_INTS.items():
        v = params.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise _invalid(f"{name}: {v!r:.40} is not an integer in {meant_lo}..{meant_hi}{note}")
        if not lo <= v <= hi:
            raise _invalid(f"{name}: {_shown(v)} is not in {meant_lo}..{meant_hi}{note}")
    stop = params.get("stop", ())
    if isinstance(stop, str):
        return {**params, "stop": (stop,)}
    if not all(isinstance(s, str) for s in stop):
        raise _invalid("stop: must be a string or a list of strings")
    return params


def _shown(v: int) -> str:
    """An integer for a message: in full up to 40 digits (str() of a 5,000-digit one raises)."""
    return str(v) if v.bit_length() <= 128 else f"{'a negative' if v < 0 else 'an'} integer of {v.bit_length()} bits"


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    """None: no deadline; otherwise a number of seconds > 0 (0 would be an instant DEADLINE_EXCEEDED)."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < float("inf")):
        raise _invalid(f"{name}: is {timeout!r}; allowed: seconds > 0, or None for no deadline")
    return timeout
