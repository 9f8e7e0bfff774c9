"""Resumable streams: continue from the last state a server sent when the stream breaks.

The server attaches its state to a message every `state_every` tokens (the message then ends
exactly at that state). When the stream breaks, the client asks any replica to continue from that
state; continuation is exact, so the new stream's first tokens are the ones the caller already got
after the state: they are dropped (by characters, logprob entries and token counts), nothing is
repeated and nothing is lost.
"""
from __future__ import annotations

import random
import re
from dataclasses import replace

import grpc

from lstmgen_client.errors import LstmgenError
from lstmgen_client.types import StreamChunk
from lstmgen_client.v1 import generator_pb2 as pb

DEFAULT_STATE_EVERY = 32
MAX_RESUMES = 8
# A replica that died mid-stream: the client sees UNAVAILABLE (connection lost) or, behind a proxy
# that resets the stream, INTERNAL/UNKNOWN naming the reset.
_DROPPED = re.compile(r"RST_STREAM|stream removed|socket closed|connection reset|goaway|eof", re.I)


def resumable(error: LstmgenError) -> bool:
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and bool(_DROPPED.search(error.message))


def new_seed() -> int:
    return random.SystemRandom().getrandbits(53)  # as the server picks them (< 2^53)


class Resumer:
    """Tracks one resumable stream: what the caller has had since the last state, and the request
    that continues it after a break."""

    MAX = MAX_RESUMES

    def __init__(self, request: pb.GenerateRequest, max_new_tokens: int, max_resumes: int = MAX_RESUMES):
        self.first = request
        self.max_new = max_new_tokens
        self.max_resumes = max_resumes
        self.resumes = 0
        self.state: bytes | None = None
        self.at_state = 0  # tokens generated up to the last state
        self.base = 0  # tokens generated before the current attempt's start
        self.attempt = 0  # tokens the current attempt has generated (the server's count)
        self._after = (0, 0, 0)  # chars, logprob entries, tokens handed over after the last state
        self._skip = [0, 0, 0]  # ... of which the current attempt has yet to regenerate
        self.finished = False  # the caller has the last message: a break after it needs no resume

    def resume_after(self, error: LstmgenError) -> bool:
        """After the stream broke with `error`: True to resume it, False when nothing is missing (the
        break came after the last message); raises `error` when it cannot be resumed."""
        if self.finished:
            return False
        if not resumable(error) or self.resumes >= self.max_resumes:
            raise error from None
        return True

    def backoff(self) -> float:
        """Seconds to wait before the next attempt: 50 ms, doubling, at most 2 s."""
        return min(2.0, 0.05 * 2 ** self.resumes)

    def next_request(self) -> pb.GenerateRequest:
        """The request that continues the stream after a break (from the last state, or anew)."""
        self.resumes += 1
        self._skip = list(self._after)
        self.attempt = 0
        if self.state is None:  # nothing to resume from: the same request again (it carries a seed)
            self.base = 0
            return self.first
        req = pb.GenerateRequest()
        req.CopyFrom(self.first)
        req.prompt, req.state, req.max_new_tokens = "", self.state, self.max_new - self.at_state
        self.base = self.at_state
        return req

    def filter(self, chunk: StreamChunk) -> StreamChunk | None:
        """The part of `chunk` the caller has not had yet (None if nothing), with counts made whole."""
        text, logprobs, tokens = chunk.text, chunk.logprobs, chunk.token_count
        self.attempt += tokens
        if any(self._skip):
            c, lp, t = self._skip
            text, logprobs, tokens = text[c:], logprobs[lp:], max(0, tokens - t)
            self._skip = [max(0, c - len(chunk.text)), max(0, lp - len(chunk.logprobs)),
                          max(0, t - chunk.token_count)]
        chars, lps, toks = self._after
        if chunk.state is not None:
            self.state, self.at_state, self._after = chunk.state, self.base + self.attempt, (0, 0, 0)
        else:
            self._after = (chars + len(text), lps + len(logprobs), toks + tokens)
        finished = chunk.finished
        self.finished = self.finished or finished is not None
        if finished is not None and self.base:
            finished = replace(finished, generated_tokens=finished.generated_tokens + self.base)
        if not (text or tokens or finished or chunk.state):
            return None
        return StreamChunk(text, tokens, finished, logprobs, chunk.state)
