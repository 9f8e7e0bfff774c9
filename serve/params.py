"""A generation request as plain data, and its validation against the server's limits.

The gRPC edge converts protobuf into `GenerationRequest`; offline sampling builds it directly.
Every check names the field and the allowed range.
"""
from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field

from lstmgen.config_args import option
from lstmgen.serve.errors import InvalidRequest
from lstmgen.serve.state_blob import GenerationState
from lstmgen.text import encode
from lstmgen.vocab import UnknownTokensError, Vocab

log = logging.getLogger("lstmgen.params")


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = option(16_384, "longest prompt accepted")
    max_new_tokens: int = option(4_096, "largest max_new_tokens accepted")
    default_new_tokens: int = option(256, "max_new_tokens when a request leaves it unset")
    max_stop_sequences: int = option(8, "most stop sequences one request may give")
    max_stop_sequence_chars: int = option(64, "longest stop sequence accepted, in characters")
    max_concurrent_streams: int = option(512, "streams generating at once (rows in the batch)",
                                         flag="--max-concurrent")
    max_queued_streams: int = option(1_024, "streams waiting for a slot; beyond this: RESOURCE_EXHAUSTED",
                                     flag="--max-queued")
    # Largest serialized request; gRPC refuses bigger ones before parsing (RESOURCE_EXHAUSTED).
    # 0: the server's default, the longest prompt at 4 UTF-8 bytes per character plus 64 KiB for the
    # rest plus the model's largest state blob (request_bytes_for).
    max_request_bytes: int = option(0, "largest request message in bytes; bigger ones get RESOURCE_EXHAUSTED "
                                       "before they are parsed (0: 4 bytes per --max-prompt-chars + 64 KiB + "
                                       "the model's largest state)")
    # most alternatives a request may ask for per token
    max_top_logprobs: int = option(20, "most alternatives a request may ask for per token (top_logprobs)")
    # Output entries (a token, or one alternative of its logprobs) one request may make the server
    # hold at once where nobody reads it token by token (an HTTP completion that is not streamed):
    # choices x max_new_tokens x (1 + top_logprobs), checked at admission. The default lets 64
    # choices of 4,096 plain tokens through (about 25 MB held at most with logprobs' objects).
    max_request_output: int = option(262_144, "output entries (tokens, logprobs and each alternative) an HTTP "
                                              "completion that is not streamed may make the server hold: "
                                              "choices x max_tokens x (2 + logprobs); more: 400")
    # Entries a stream may hold unread; past it the row leaves the batch (its state kept) until its
    # reader catches up: a client that stops reading stops its generation instead of buffering it.
    max_unread_output: int = option(1_024, "entries a stream may hold unread; past it its generation pauses "
                                           "until the client reads (backpressure)")


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
MAX_LOGIT_BIAS = 100.0  # |value| (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI
INT32_MAX = 2**31 - 1  # the proto's int32 fields; the kernels take int64, JSON and Python any size


@dataclass(frozen=True)
class SamplingParams:
    """Applied in this order (Hugging Face / TGI): repetition_penalty, frequency and presence
    penalties, temperature, top_k, top_p, min_p; then one draw from the request's generator."""

    temperature: float = option(1.0, "softmax temperature (0 = greedy)")
    top_k: int = option(0, "keep the k most likely tokens (0: off)")
    top_p: float = option(1.0, "nucleus mass in (0, 1] (1: off)")
    min_p: float = option(0.0, "drop tokens below min_p x the top probability (0: off)")
    # HF: over prompt and generated tokens
    repetition_penalty: float = option(1.0, "HF-style penalty over seen tokens (1: off)")
    # OpenAI: x count in generated tokens; once a token was generated
    frequency_penalty: float = option(0.0, "OpenAI-style, x count (0: off)")
    presence_penalty: float = option(0.0, "OpenAI-style, once seen (0: off)")
    greedy: bool = option(False, "argmax decoding")
    seed: int = option(0, "the request's random seed")

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
    # continue from this state (decoded from its blob at the edge, serve/state_blob.py); the prompt may be empty
    state: GenerationState | None = None
    return_state: bool = False  # the last output carries the state after it
    state_every: int = 0  # and every this many tokens (0: never), for resumable streams
    # OpenAI's logit_bias: (token id, value in [-100, 100]) pairs added to the logits before sampling
    logit_bias: tuple[tuple[int, float], ...] = ()


def _integer(name: str, v: object, lo: int, hi: int, note: str = "") -> int:
    """`v` as an int in lo..hi, or InvalidRequest naming the field (bools are not integers)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(name, f"is {shown_value(v)}; expected an integer in {lo}..{hi}{note}")
    if not lo <= v <= hi:
        raise InvalidRequest(name, f"is {shown_value(v)}; allowed {lo}..{hi}{note}")
    return v


def _real(name: str, v: object) -> float:
    """`v` as a float, or InvalidRequest naming the field (an int too big for a double included)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(name, f"is {shown_value(v)}; expected a number")
    try:
        return float(v)
    except OverflowError:
        raise InvalidRequest(name, f"is {shown_value(v)}; out of range for a number") from None


def shown_value(v: object) -> str:
    """A value for an error message: a 5,000-digit integer is not repeated in full."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def validate(req: GenerationRequest, limits: RequestLimits) -> int:
    """Check every field against the range the kernels accept, before the request shares a step
    with anyone (a value that fails inside a shared step would end the other rows too); returns
    the effective max_new_tokens."""
    if not isinstance(req.prompt, str) or (not req.prompt and req.state is None):
        raise InvalidRequest("prompt", "must be a non-empty string (empty only when the request continues "
                                       "from a state)")
    if len(req.prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"holds {len(req.prompt)} characters; allowed 1..{limits.max_prompt_chars}")
    n = limits.default_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    n = _integer("max_new_tokens", n, 1, limits.max_new_tokens)
    s = req.sampling
    if not s.greedy:
        t = _real("temperature", s.temperature)
        if math.isnan(t) or math.isinf(t) or t < 0:
            raise InvalidRequest("temperature", f"is {t}; allowed: finite and >= 0 (0 = greedy)")
        top_p = _real("top_p", s.top_p)
        if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidRequest("top_p", f"is {top_p}; allowed (0, 1]")
        _integer("top_k", s.top_k, 0, INT32_MAX, " (0 = off)")
        min_p = _real("min_p", s.min_p)
        if math.isnan(min_p) or not 0.0 <= min_p <= 1.0:
            raise InvalidRequest("min_p", f"is {min_p}; allowed [0, 1] (0 = off)")
    rep = _real("repetition_penalty", s.repetition_penalty)
    if math.isnan(rep) or not MIN_REPETITION_PENALTY <= rep <= MAX_REPETITION_PENALTY:
        raise InvalidRequest("repetition_penalty", f"is {rep}; allowed [{MIN_REPETITION_PENALTY:g}, "
                                                   f"{MAX_REPETITION_PENALTY:g}] (1 = off)")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _real(name, getattr(s, name))
        if math.isnan(v) or not -MAX_OPENAI_PENALTY <= v <= MAX_OPENAI_PENALTY:
            raise InvalidRequest(name, f"is {v}; allowed [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}] (0 = off)")
    _integer("state_every", req.state_every, 0, limits.max_new_tokens, " (0 = off)")
    _integer("top_logprobs", req.top_logprobs, 0, limits.max_top_logprobs)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs to be set")
    _integer("seed", s.seed, 0, 2**64 - 1)
    _check_logit_bias(req.logit_bias)
    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidRequest("stop", f"holds {len(req.stop)} sequences; allowed 0..{limits.max_stop_sequences}")
    for i, seq in enumerate(req.stop):
        if not isinstance(seq, str) or not 1 <= len(seq) <= limits.max_stop_sequence_chars:
            raise InvalidRequest(f"stop[{i}]", f"must be a string of 1..{limits.max_stop_sequence_chars} characters")
    return n


def _check_logit_bias(bias: tuple[tuple[int, float], ...]) -> None:
    """Types and ranges; the ids against the vocabulary in check_bias_ids (validate has no vocabulary)."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequest("logit_bias", f"holds {len(bias)} entries; allowed at most {MAX_LOGIT_BIAS_ENTRIES}")
    for token, value in bias:
        _integer("logit_bias", token, 0, INT32_MAX, " (a token id)")
        v = _real(f"logit_bias[{token}]", value)
        if math.isnan(v) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias[{token}]", f"is {shown_value(value)}; allowed [-{MAX_LOGIT_BIAS:g}, "
                                                         f"{MAX_LOGIT_BIAS:g}]")


def check_bias_ids(req: GenerationRequest, vocab_size: int) -> None:
    for token, _ in req.logit_bias:
        if token >= vocab_size:
            raise InvalidRequest("logit_bias", f"token id {token} is not in the vocabulary (ids 0..{vocab_size - 1}; "
                                               "ModelInfo.vocabulary / GET /v1/models list them)")


def output_entries(max_new_tokens: int, top_logprobs: int, logprobs: bool) -> int:
    """What one choice may make the server hold: a token, plus its logprob and alternatives."""
    return max_new_tokens * (1 + (1 + top_logprobs if logprobs else 0))


def encode_prompt(req: GenerationRequest, vocab: Vocab) -> list[int]:
    """Prompt -> ids with the one unknown-symbol policy (lstmgen/text.py `encode`: unknown words ->
    <unk> when the vocabulary has it, other unknown symbols an error or with skip_unknown dropped);
    an empty result is an error (unless the request continues from a state: an empty prompt is then
    a pure continuation)."""
    if not req.prompt:
        return []
    try:
        enc = encode(vocab, req.prompt, skip_unknown=req.skip_unknown)
    except UnknownTokensError as e:
        kind = "characters" if vocab.level == "char" else "words"
        raise InvalidRequest("prompt", f"{e}; the model's vocabulary has {len(vocab)} {kind}; "
                                       "skip_unknown drops them (--skip-unknown on the command line)") from e
    if enc.unk_mapped:  # said once per request: the reply has no field for it (`<unk>` typed is a known word)
        shown = ", ".join(shown_value(w) for w in enc.unknown[:5])
        log.info("prompt request_id=%s: %d unknown word(s) read as <unk>: %s%s", req.request_id or "-",
                 enc.unk_mapped, shown, ", ..." if len(enc.unknown) > 5 else "",
                 extra={"request_id": req.request_id})
    ids = enc.ids.tolist()
    if not ids and req.state is None:
        raise InvalidRequest("prompt", "encodes to no tokens (every symbol was unknown and skipped)")
    return ids
