"""OpenAI completions JSON <-> plain dataclasses: the HTTP edge's counterpart of `request_from_pb`.

No web framework here, so every rule is testable on its own. A body becomes one
`GenerationRequest` per choice: each prompt (a string, or a list of strings) times `n`. With a
`seed`, the request's k-th choice (prompt i, sample j: k = i * n + j) samples with `seed + k`
(completion.nth_seed), the rule of every front end (the in-process Generator's prompt i,
offline's sample j): the choices differ, and each replays alone with its own seed. Field errors
raise `InvalidRequest` naming the OpenAI parameter (`max_tokens`, not our `max_new_tokens`),
which the edge answers with HTTP 400 and `"param"` set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lstmgen.serve.completion import nth_seed
from lstmgen.serve.errors import InvalidRequest
from lstmgen.serve.params import GenerationRequest, SamplingParams, shown_value
from lstmgen.serve.records import Finished, TokenLogprob
from lstmgen.serve.stopping import FinishReason

MAX_CHOICES = 64  # prompts x n in one request: each choice holds an admission slot
# Our field names -> the OpenAI parameter a user wrote (for error messages and "param").
PARAM_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}
FINISH_REASON = {FinishReason.LENGTH: "length", FinishReason.STOP_SEQUENCE: "stop",
                 FinishReason.END_OF_TEXT: "stop"}
# Accepted and ignored: they do not change what we generate.
_IGNORED = {"model", "user", "stream_options", "stream"}
_FLOATS = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
           "frequency_penalty": 0.0, "presence_penalty": 0.0}
_KNOWN = _IGNORED | set(_FLOATS) | {"prompt", "max_tokens", "n", "seed", "stop", "logprobs", "top_k",
                                    "skip_unknown", "echo", "best_of", "suffix", "logit_bias"}


@dataclass(frozen=True)
class CompletionRequest:
    choices: tuple[GenerationRequest, ...]  # prompt-major: choice index = prompt index * n + j
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    logprobs: int | None  # None: not asked; k: each token's logprob and the k most likely
    model: str | None = None  # as the client named it


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    try:  # an integer too large for a double raises OverflowError, not a non-finite float
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidRequest(name, f"is {shown_value(v)}; expected a finite number")
    return float(v)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    """An integer field; its range is checked by params.validate (or here, for the edge's own)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(name, f"is {shown_value(v)}; expected an integer")
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise InvalidRequest(name, f"is {shown_value(v)}; expected true or false")
    return v


def _strings(body: dict, name: str, allow_empty_list: bool) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest(name, "expected a string or a list of strings (token arrays are not supported: "
                                   "send text)")
    if not items and not allow_empty_list:
        raise InvalidRequest(name, "must not be an empty list")
    return items


def check_object(body: object, known: set[str], route: str, note: str = "") -> dict:
    """`body` as a JSON object holding only `known` keys; else InvalidRequest naming the first other."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "expected a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(unknown[0], f"is not a parameter of this server's {route}{note}")
    return body


def parse_completion(body: object, request_id: str) -> CompletionRequest:
    """A /v1/completions body -> one GenerationRequest per choice; raises InvalidRequest."""
    body = check_object(body, _KNOWN, "/v1/completions")
    if body.get("prompt") is None:
        raise InvalidRequest("prompt", "is required (a string or a list of strings)")
    prompts = _strings(body, "prompt", allow_empty_list=False)
    n = _integer(body, "n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest("n", f"is {n}; allowed 1..{MAX_CHOICES}")
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequest("n", f"{len(prompts)} prompt(s) x n={n} choices; allowed at most {MAX_CHOICES}")
    # Unsupported options: their "off" value (false, null, "", best_of == n) is accepted, as
    # clients send it by default; anything else, of any type, is refused naming the option.
    if _flag(body, "echo"):
        raise InvalidRequest("echo", "is not supported: the response holds the generated text only")
    if body.get("suffix") not in (None, ""):
        raise InvalidRequest("suffix", "is not supported (no insertion mode)")
    best_of = _integer(body, "best_of", None)
    if best_of is not None and best_of != n:
        raise InvalidRequest("best_of", f"is {best_of}; only best_of == n ({n}) is supported")
    logprobs = _integer(body, "logprobs", None)
    if logprobs is not None and logprobs < 0:
        raise InvalidRequest("logprobs", f"is {logprobs}; allowed >= 0 (the number of alternatives per token)")
    skip = _flag(body, "skip_unknown")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("stream_options", "expected an object")
    if options is not None and not stream:
        raise InvalidRequest("stream_options", "is only allowed with \"stream\": true (as OpenAI's API)")
    options = options or {}
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**64:  # never wrapped: -1 is not 2^64-1
        raise InvalidRequest("seed", f"is {shown_value(seed)}; allowed 0..18446744073709551615 (2^64-1)")
    f = {name: _number(body, name, default) for name, default in _FLOATS.items()}
    base = SamplingParams(top_k=_integer(body, "top_k", 0), **f)
    common = dict(max_new_tokens=_integer(body, "max_tokens", None), stop=tuple(_strings(body, "stop", True)),
                  skip_unknown=skip, logprobs=logprobs is not None, top_logprobs=logprobs or 0,
                  logit_bias=logit_bias(body.get("logit_bias")))
    choices = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            s = base if seed is None else replace(base, seed=nth_seed(seed, i * n + j))
            rid = request_id if len(prompts) * n == 1 else f"{request_id}-{i * n + j}"
            choices.append(GenerationRequest(prompt=prompt, sampling=s, seed_given=seed is not None,
                                             request_id=rid, **common))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model", f"is {model!r}; expected a string")
    return CompletionRequest(tuple(choices), n, stream, bool(options.get("include_usage")), logprobs, model)


def logit_bias(v: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} (ids as JSON object keys, so strings) -> sorted (id, bias) pairs;
    ranges are checked by params.validate, ids against the vocabulary at submit."""
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise InvalidRequest("logit_bias", "expected an object mapping token ids to numbers, e.g. {\"42\": -100}")
    pairs = []
    for key, value in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidRequest("logit_bias", f"key {shown_value(key)} is not a token id (a decimal integer)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest("logit_bias", f"value for {key} is {shown_value(value)}; expected a number in [-100, 100]")
        pairs.append((int(key), value))
    return tuple(sorted(pairs))


def param_name(error: InvalidRequest, choice: int, prompts: int, n: int) -> str:
    """The OpenAI parameter an InvalidRequest from validation is about (`prompt[1]` for the
    second of several prompts)."""
    name = PARAM_NAMES.get(error.field, error.field)
    if name == "prompt" and prompts > 1:
        return f"prompt[{choice // n}]"
    return name


def logprobs_json(lps: list[TokenLogprob], offset: int) -> dict:
    """OpenAI completions `logprobs`: tokens, their logprobs, the alternatives and text offsets
    (offsets count from the start of the choice's generated text, as there is no echo)."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.text)
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text: v for _t, text, v in lp.top} for lp in lps], "text_offset": offsets}


def usage_json(finished: list[Finished | None], n: int) -> dict:
    """Prompt tokens once per prompt (as OpenAI counts them), generated tokens of every choice."""
    prompt = sum(f.prompt_tokens for i, f in enumerate(finished) if f is not None and i % n == 0)
    completion = sum(f.generated_tokens for f in finished if f is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_json(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class CompletionFormat:
    """Response bodies of /v1/completions (the edge's `Format`; openai_chat.ChatFormat is the other)."""

    id_prefix, whole, chunk = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def param(name: str) -> str:
        return name

    @staticmethod
    def choice(i: int, text: str, lps: list[TokenLogprob] | None, fin: Finished | None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs_json(lps, 0) if lps is not None else None,
                "finish_reason": FINISH_REASON[fin.reason] if fin else None, **({"seed": fin.seed} if fin else {})}

    @staticmethod
    def delta(i: int, text: str, lps: list[TokenLogprob] | None, offset: int, fin: Finished | None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs_json(lps, offset) if lps is not None else None,
                "finish_reason": FINISH_REASON[fin.reason] if fin else None, **({"seed": fin.seed} if fin else {})}
