"""A generation request as plain data, and its validation against the server's limits.

The gRPC edge converts protobuf into `GenerationRequest`; offline sampling builds it directly.
Every check names the field and the allowed range.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from lstmgen.serve.errors import InvalidRequest
from lstmgen.vocab import UnknownTokensError, Vocab


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 16_384
    max_new_tokens: int = 4_096
    default_new_tokens: int = 256
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 64
    max_concurrent_streams: int = 512
    max_queued_streams: int = 1_024
    # Largest serialized request; gRPC refuses bigger ones before parsing (RESOURCE_EXHAUSTED).
    # 0: the server's default, the longest prompt at 4 UTF-8 bytes per character plus 64 KiB for the
    # rest plus the model's largest state blob (request_bytes_for).
    max_request_bytes: int = 0
    max_top_logprobs: int = 20  # most alternatives a request may ask for per token


def request_bytes_for(max_prompt_chars: int, max_state_bytes: int = 0) -> int:
    """The default max_request_bytes for a prompt limit and a model's largest state."""
    return 4 * max_prompt_chars + 64 * 1024 + max_state_bytes


# Temperatures below this decode greedily: logits / 1e-40 overflow float32 to inf, then NaN.
MIN_TEMPERATURE = 1e-4
MAX_REPETITION_PENALTY = 100.0
# Its mirror, 0.01 (favouring a seen token as much as 100 disfavours it): a positive logit divided by
# much less overflows to inf (1e-45 made every logit non-finite and the request fail with INTERNAL).
# As float32, the type the proto carries it in, so that 0.01 sent is 0.01 allowed.
MIN_REPETITION_PENALTY = struct.unpack("f", struct.pack("f", 1.0 / MAX_REPETITION_PENALTY))[0]
MAX_OPENAI_PENALTY = 2.0  # |frequency_penalty|, |presence_penalty| (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    """Applied in this order (Hugging Face / TGI): repetition_penalty, frequency and presence
    penalties, temperature, top_k, top_p, min_p; then one draw from the request's generator."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off (HF: over prompt and generated tokens)
    frequency_penalty: float = 0.0  # 0: off (OpenAI: x count in generated tokens)
    presence_penalty: float = 0.0  # 0: off (OpenAI: once a token was generated)
    greedy: bool = False
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed_given: bool = False  # False: the server picked sampling.seed
    stop: tuple[str, ...] = ()
    skip_unknown: bool = False
    request_id: str = ""
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives (needs logprobs)
    state: bytes = b""  # continue from this state blob (serve/state_blob.py); the prompt may be empty
    return_state: bool = False  # the last output carries the state after it
    state_every: int = 0  # and every this many tokens (0: never), for resumable streams


def validate(req: GenerationRequest, limits: Limits) -> int:
    """Check every field; returns the effective max_new_tokens."""
    if not req.prompt and not req.state:
        raise InvalidRequest("prompt", "must not be empty (unless the request continues from a state)")
    if len(req.prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"holds {len(req.prompt)} characters; allowed 1..{limits.max_prompt_chars}")
    n = limits.default_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    if not 1 <= n <= limits.max_new_tokens:
        raise InvalidRequest("max_new_tokens", f"is {n}; allowed 1..{limits.max_new_tokens}")
    s = req.sampling
    if not s.greedy:
        if math.isnan(s.temperature) or math.isinf(s.temperature) or s.temperature < 0:
            raise InvalidRequest("temperature", f"is {s.temperature}; allowed: finite and >= 0 (0 = greedy)")
        if math.isnan(s.top_p) or not 0.0 < s.top_p <= 1.0:
            raise InvalidRequest("top_p", f"is {s.top_p}; allowed (0, 1]")
        if s.top_k < 0:
            raise InvalidRequest("top_k", f"is {s.top_k}; allowed >= 0 (0 = off)")
        if math.isnan(s.min_p) or not 0.0 <= s.min_p <= 1.0:
            raise InvalidRequest("min_p", f"is {s.min_p}; allowed [0, 1] (0 = off)")
    rep = s.repetition_penalty
    if math.isnan(rep) or not MIN_REPETITION_PENALTY <= rep <= MAX_REPETITION_PENALTY:
        raise InvalidRequest("repetition_penalty", f"is {rep}; allowed [{MIN_REPETITION_PENALTY:g}, "
                                                   f"{MAX_REPETITION_PENALTY:g}] (1 = off)")
    for name in ("frequency_penalty", "presence_penalty"):
        v = getattr(s, name)
        if math.isnan(v) or not -MAX_OPENAI_PENALTY <= v <= MAX_OPENAI_PENALTY:
            raise InvalidRequest(name, f"is {v}; allowed [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}] (0 = off)")
    if not 0 <= req.state_every <= limits.max_new_tokens:
        raise InvalidRequest("state_every", f"is {req.state_every}; allowed 0..{limits.max_new_tokens} (0 = off)")
    if not 0 <= req.top_logprobs <= limits.max_top_logprobs:
        raise InvalidRequest("top_logprobs", f"is {req.top_logprobs}; allowed 0..{limits.max_top_logprobs}")
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs to be set")
    if not 0 <= s.seed < 2**64:
        raise InvalidRequest("seed", f"is {s.seed}; allowed 0..2^64-1")
    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidRequest("stop", f"holds {len(req.stop)} sequences; allowed 0..{limits.max_stop_sequences}")
    for i, seq in enumerate(req.stop):
        if not 1 <= len(seq) <= limits.max_stop_sequence_chars:
            raise InvalidRequest(f"stop[{i}]", f"has {len(seq)} characters; allowed 1..{limits.max_stop_sequence_chars}")
    return n


def encode_prompt(req: GenerationRequest, vocab: Vocab) -> list[int]:
    """Prompt -> ids with the request's unknown-symbol policy; an empty result is an error
    (unless the request continues from a state: an empty prompt is then a pure continuation)."""
    if not req.prompt:
        return []
    if vocab.level == "word" and vocab.unk_id is not None:
        policy = "unk"
    else:
        policy = "skip" if req.skip_unknown else "error"
    try:
        ids = vocab.encode(req.prompt, on_unknown=policy)
    except UnknownTokensError as e:
        kind = "characters" if vocab.level == "char" else "words"
        raise InvalidRequest("prompt", f"{e}; the model's vocabulary has {len(vocab)} {kind}; "
                                       "skip_unknown drops them (--skip-unknown on the command line)") from e
    if not ids and not req.state:
        raise InvalidRequest("prompt", "encodes to no tokens (every symbol was unknown and skipped)")
    return ids
