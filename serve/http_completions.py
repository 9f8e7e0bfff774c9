"""POST /v1/completions and /v1/chat/completions, once the token is checked (serve/http_api.py).

A request is read (size-capped), parsed into one GenerationRequest per choice and admitted whole
or not at all. Not streamed, each choice is read to its end through `submit_completion` (the
worker keeps its tokens and makes the text once, at the end: no wake-up per token) and the
response is written once every choice has ended; streamed, each is a Stream that
serve/http_events.py turns into server-sent events. Either way, a client that disconnects, an
error or any other early exit cancels every choice still running (their rows leave at the next
step and their admission slots come back), and the call is one stream in the metrics with one
access line (`Call.end`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from lstmgen.serve.completion import CompletionSink
from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded
from lstmgen.serve.http_events import EventStream, dumps, events, wait_disconnect
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.openai_compat import CompletionRequest, error_json, param_name, usage_json
from lstmgen.serve.params import output_entries, request_bytes_for, validate
from lstmgen.serve.scheduler import Scheduler
from lstmgen.serve.service import REQUEST_ID_KEY, ServiceConfig, rejection_reason, request_id, status_for
from lstmgen.serve.stream import Stream

log = logging.getLogger("lstmgen.http")
# gRPC status name (the metrics' label) -> HTTP status and OpenAI error type
_HTTP = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
         "UNAVAILABLE": (503, "service_unavailable_error"), "UNAUTHENTICATED": (401, "authentication_error")}


def json_response(body: dict, status: int, headers: dict[str, str]) -> Response:
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


class TooLarge(Overloaded):
    """A body over --max-request-bytes: 413, counted as gRPC counts it (RESOURCE_EXHAUSTED)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body of {size} bytes is over the limit of {limit} (--max-request-bytes)")


class ModelNotFound(InvalidRequest):
    def __init__(self, asked: str, served: str):
        super().__init__("model", f"{asked!r} is not served here; this server serves {served!r} (GET /v1/models)")


_HTTP_SPECIAL = {TooLarge: 413, ModelNotFound: 404}


class Call:
    """One completion request's bookkeeping: its choices (Streams when streamed, else
    CompletionSinks), status and the single end-of-call record."""

    def __init__(self, edge: "Completions", rid: str):
        self.edge, self.rid, self.t0 = edge, rid, time.perf_counter()
        self.choices: list[Stream | CompletionSink] = []
        self.status, self.tokens, self.error = "CANCELLED", 0, ""
        edge.metrics.open_streams.inc()

    def took(self, tokens: int) -> None:
        """Tokens read from a stream: the first ones time the call's first token."""
        if self.tokens == 0 and tokens:
            self.edge.metrics.ttft.observe(time.perf_counter() - self.t0)
        self.tokens += tokens

    def head(self, fmt, kind: str) -> dict:
        return {"id": f"{fmt.id_prefix}-{self.rid}", "object": kind, "created": int(time.time()),
                "model": self.edge.model_name, "system_fingerprint": None}

    def failed(self, e: Exception, param_of=lambda name: name) -> tuple[int, dict]:
        """Status, metrics and the OpenAI error body for an exception (`param_of`: the parameter
        as the client's API names it)."""
        code = status_for(e).name
        self.status, self.error = code, str(e)
        if not isinstance(e, GenerationError):
            log.exception("unexpected error request_id=%s", self.rid, extra={"request_id": self.rid})
            self.error = f"internal error ({type(e).__name__}); the server log has it under request_id={self.rid}"
        elif not self.choices and rejection_reason(e) and not isinstance(e, TooLarge):
            self.edge.metrics.rejected(rejection_reason(e))
        http, kind = _HTTP.get(code, (500, "server_error"))
        if isinstance(e, TooLarge):  # not a rate limit: the SDKs would wait and send it again
            kind = "invalid_request_error"
        http = next((v for cls, v in _HTTP_SPECIAL.items() if isinstance(e, cls)), http)
        param = getattr(e, "field", None)
        if param is not None:
            param = param_of(param)
            self.error = f"{param}: {self.error.partition(': ')[2]}" if isinstance(e, InvalidRequest) else self.error
        return http, error_json(self.error, kind, param, code.lower())

    def end(self) -> None:
        for choice in self.choices:
            choice.cancel()  # no-op once ended; frees the row (and slot) of a client that went away
        m = self.edge.metrics
        m.open_streams.dec()
        m.stream_ended(self.status)
        level = logging.ERROR if self.status == "INTERNAL" else logging.INFO
        log.log(level, "completion end request_id=%s status=%s choices=%d tokens=%d duration_ms=%.1f%s",
                self.rid, self.status, len(self.choices), self.tokens, (time.perf_counter() - self.t0) * 1e3,
                f" error={self.error!r}" if self.error else "", extra={"request_id": self.rid})


class Completions:
    """The completions handler shared by both routes: `fmt` writes the bodies (CompletionFormat,
    ChatFormat), `parse` turns the JSON body into a CompletionRequest."""

    def __init__(self, scheduler: Scheduler, model_name: str, metrics: Metrics, cfg: ServiceConfig):
        self.scheduler, self.model_name, self.metrics, self.cfg = scheduler, model_name, metrics, cfg

    async def __call__(self, request: Request, fmt: type,
                       parse: Callable[[object, str], CompletionRequest]) -> Response:
        rid = request_id(((REQUEST_ID_KEY, request.headers.get(REQUEST_ID_KEY)),))
        try:  # not a stream (nor in open_streams) until its body is read
            body = await self._json(request)
        except ClientDisconnect:  # the client left mid-body: a cancel, not a server error
            self.metrics.stream_ended("CANCELLED")
            log.info("completion cancelled request_id=%s: the client disconnected before its body was read", rid,
                     extra={"request_id": rid})
            return Response(status_code=499)  # nobody reads it
        except GenerationError as e:
            body = e
        call = Call(self, rid)
        headers = {REQUEST_ID_KEY: call.rid}
        try:
            if isinstance(body, Exception):
                raise body
            creq = parse(body, call.rid)
            self._submit(call, creq)
        except Exception as e:
            status, body = call.failed(e, fmt.param)
            call.end()
            return json_response(body, status, headers)
        if creq.stream:
            return EventStream(events(call, creq, fmt), headers)
        try:
            body = await _unless_disconnected(request, self._collect(call, creq, fmt))
        except _Disconnected:
            call.end()  # status stays CANCELLED
            return Response(status_code=499)  # nobody reads it
        except asyncio.CancelledError:
            call.end()
            raise
        except Exception as e:
            status, body = call.failed(e)
            call.end()
            return json_response(body, status, headers)
        call.status = "OK"
        call.end()
        return json_response(body, 200, headers)

    async def _json(self, request: Request) -> object:
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            raise InvalidRequest("body", "framed twice: a request may not carry both Content-Length and "
                                         "Transfer-Encoding (RFC 9112, 6.1)")
        limit = self.scheduler.limits.max_request_bytes or request_bytes_for(self.scheduler.limits.max_prompt_chars)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise TooLarge(int(declared), limit)
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise TooLarge(len(data), limit)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:  # a 5,000-digit integer is a ValueError too
            raise InvalidRequest("body", f"is not valid JSON ({e})") from None
        except RecursionError:
            raise InvalidRequest("body", "nests arrays or objects too deeply to be a completion request") from None

    def _submit(self, call: Call, creq: CompletionRequest) -> None:
        """Admit every choice or none: a refusal cancels the ones already admitted."""
        if creq.model not in (None, self.model_name):
            raise ModelNotFound(creq.model, self.model_name)
        prompts = len(creq.choices) // creq.n
        if not creq.stream:
            self._check_output(creq, prompts)
        submit = self.scheduler.submit if creq.stream else self.scheduler.submit_completion
        for i, req in enumerate(creq.choices):
            try:
                call.choices.append(submit(req))
            except GenerationError as e:
                for choice in call.choices:  # a refused request holds nothing (and counts as a rejection)
                    choice.cancel()
                call.choices.clear()
                if isinstance(e, InvalidRequest):  # named as the client wrote it: max_tokens, prompt[1]
                    raise InvalidRequest(param_name(e, i, prompts, creq.n), str(e).partition(": ")[2]) from None
                raise

    def _check_output(self, creq: CompletionRequest, prompts: int) -> None:
        """A completion that is not streamed is held whole until its end: refuse one whose choices
        could make more than max_request_output entries (tokens, logprobs and alternatives)."""
        limits = self.scheduler.limits
        entries = 0
        for i, req in enumerate(creq.choices):
            try:
                n_new = validate(req, limits)
            except InvalidRequest as e:  # named as the client wrote it
                raise InvalidRequest(param_name(e, i, prompts, creq.n), str(e).partition(": ")[2]) from None
            entries += output_entries(n_new, req.top_logprobs, req.logprobs)
        if entries > limits.max_request_output:
            lp = f" x (2 + logprobs {creq.logprobs})" if creq.logprobs is not None else ""
            raise InvalidRequest("max_tokens", f"{len(creq.choices)} choice(s) x max_tokens{lp} = {entries:,} output "
                                               f"entries; a request that is not streamed may make at most "
                                               f"{limits.max_request_output:,} (GET /v1/models: "
                                               "lstmgen.limits.max_request_output): stream it, or lower n, "
                                               "max_tokens or logprobs")

    async def _collect(self, call: Call, creq: CompletionRequest, fmt) -> dict:
        """The whole response once every choice has ended; the first failed choice (in choice
        order) fails the call. The time to first token is the core's (Completed.first_token_at):
        the edge sees no token before a choice ends."""
        waits = [asyncio.wrap_future(sink.future) for sink in call.choices]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
            for w in waits:
                if w.done() and not w.cancelled() and w.exception() is not None:
                    raise w.exception()
            done = [w.result() for w in waits]
        finally:
            for w in waits:  # on any early exit (a disconnect cancels this task): nothing left running
                if not w.done():
                    w.cancel()  # cancels its sink's future: the row leaves at the next step
                elif not w.cancelled():
                    w.exception()  # read: an error that came after the wait is not logged as never retrieved
            # Failed or cancelled calls too, as a streamed call counts what it read: the core's
            # first-token time and each row's count (plain numbers the worker only ever raises; a
            # quiet row's count is its stopper's at its end, so a quiet row cut short counts 0)
            gens = [sink.seq for sink in call.choices if sink.seq is not None]
            firsts = [g.first_token_at for g in gens if g.first_token_at is not None]
            if firsts:
                call.edge.metrics.ttft.observe(max(min(firsts) - call.t0, 0.0))
            call.tokens = sum(g.stopper.generated for g in gens)
        choices = [fmt.choice(i, c.text, list(c.logprobs) if creq.logprobs is not None else None, c.finished)
                   for i, c in enumerate(done)]
        return {**call.head(fmt, fmt.whole), "choices": choices,
                "usage": usage_json([c.finished for c in done], creq.n)}


class _Disconnected(Exception):
    pass


async def _unless_disconnected(request: Request, work):
    """Run `work` unless the client disconnects first (then _Disconnected; `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    left = False
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
        left = not task.done()
    finally:
        watch.cancel()
        if not task.done():  # the client left, or this handler is cancelled (shutdown): `work` stops too
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if left:
        raise _Disconnected()
    return task.result()
