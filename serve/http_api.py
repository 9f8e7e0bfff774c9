"""The HTTP edge: an OpenAI-compatible API and the playground page, on the gRPC server's scheduler.

`lstmgen serve BUNDLE --http-port P` adds, in the same process and on the same Scheduler (one
model, one batch shared with the gRPC streams):

    POST /v1/completions   OpenAI completions (serve/openai_compat.py); `stream` sends server-sent events
    GET  /v1/models        the one model, with its sizes and the server's limits under "lstmgen"
    GET  /health           200 while serving, 503 once stopping (no token needed)
    GET  /                 the playground page (serve/playground/index.html; no token needed to load it)

Errors map from the gRPC status of the same error (service.status_for), so both edges refuse alike:
bad field -> 400 naming it in "param", full -> 429, stopping -> 503, no/wrong token -> 401. Each
completion is one stream in the metrics (open streams, time to first token, status, rejections)
and one access line with its request id (`X-Request-Id`, echoed). A client that disconnects
cancels its choices' streams, freeing their rows at the next step, as a gRPC cancel does.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lstmgen.serve.errors import GenerationError, InvalidRequest, Overloaded, Unauthenticated
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.openai_chat import ChatFormat, ChatTemplate, chat_to_completion
from lstmgen.serve.openai_compat import (CompletionFormat, CompletionRequest, error_json, param_name,
                                         parse_completion, usage_json)
from lstmgen.serve.params import MIN_TEMPERATURE, output_entries, request_bytes_for, validate
from lstmgen.serve.records import Chunk
from lstmgen.serve.scheduler import Scheduler
from lstmgen.serve.stream import Stream
from lstmgen.serve.service import (REQUEST_ID_KEY, ServiceConfig, pace, rejection_reason, request_id,
                                   status_for)

log = logging.getLogger("lstmgen.http")
PLAYGROUND = Path(__file__).parent / "playground" / "index.html"
# gRPC status name (the metrics' label) -> HTTP status and OpenAI error type
_HTTP = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
         "UNAVAILABLE": (503, "service_unavailable_error"), "UNAUTHENTICATED": (401, "authentication_error")}


class _Call:
    """One completion request's bookkeeping: its streams, status and the single end-of-call record."""

    def __init__(self, api: "HttpApi", rid: str):
        self.api, self.rid, self.t0 = api, rid, time.perf_counter()
        self.streams: list[Stream] = []
        self.status, self.tokens, self.error = "CANCELLED", 0, ""
        api.metrics.open_streams.inc()

    def took(self, chunk: Chunk) -> None:
        if self.tokens == 0 and chunk.token_count:
            self.api.metrics.ttft.observe(time.perf_counter() - self.t0)
        self.tokens += chunk.token_count

    def failed(self, e: Exception, param_of=lambda name: name) -> tuple[int, dict]:
        """Status, metrics and the OpenAI error body for an exception (`param_of`: the parameter
        as the client's API names it)."""
        code = status_for(e).name
        self.status, self.error = code, str(e)
        if not isinstance(e, GenerationError):
            log.exception("unexpected error request_id=%s", self.rid, extra={"request_id": self.rid})
            self.error = f"internal error ({type(e).__name__}); the server log has it under request_id={self.rid}"
        elif not self.streams and rejection_reason(e) and not isinstance(e, _TooLarge):
            self.api.metrics.rejected(rejection_reason(e))
        http, kind = _HTTP.get(code, (500, "server_error"))
        if isinstance(e, _TooLarge):  # not a rate limit: the SDKs would wait and send it again
            kind = "invalid_request_error"
        http = next((v for cls, v in _HTTP_SPECIAL.items() if isinstance(e, cls)), http)
        param = getattr(e, "field", None)
        if param is not None:
            param = param_of(param)
            self.error = f"{param}: {self.error.partition(': ')[2]}" if isinstance(e, InvalidRequest) else self.error
        return http, error_json(self.error, kind, param, code.lower())

    def end(self) -> None:
        for s in self.streams:
            s.cancel()  # no-op once read to its end; frees the row of a client that went away
        m = self.api.metrics
        m.open_streams.dec()
        m.stream_ended(self.status)
        level = logging.ERROR if self.status == "INTERNAL" else logging.INFO
        log.log(level, "completion end request_id=%s status=%s choices=%d tokens=%d duration_ms=%.1f%s",
                self.rid, self.status, len(self.streams), self.tokens, (time.perf_counter() - self.t0) * 1e3,
                f" error={self.error!r}" if self.error else "", extra={"request_id": self.rid})


class HttpApi:
    def __init__(self, scheduler: Scheduler, model_name: str, metrics: Metrics | None = None,
                 cfg: ServiceConfig = ServiceConfig(), token: str | None = None,
                 chat_template: ChatTemplate = ChatTemplate()):
        self.scheduler, self.model_name, self.cfg = scheduler, model_name, cfg
        self.chat_template = chat_template
        self.metrics = metrics or Metrics()
        self._token = token.encode() if token else None
        self.stopping = False  # /health answers 503 once set
        routes = [Route("/", self.playground), Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/models/{model_id:path}", self.model), Route("/v1/completions", self.completions,
                                                                         methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        self.routes = [f"{m} {r.path}".replace(":path}", "}") for r in routes for m in sorted(r.methods - {"HEAD"})]
        self.app = Starlette(routes=routes, exception_handlers={404: self._no_route, 405: self._no_route})

    # -- the small routes ------------------------------------------------------------------------
    async def playground(self, request: Request) -> Response:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        if self.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        asked = request.path_params["model_id"]
        if asked != self.model_name:
            return _json_response(error_json(f"model {asked!r} is not served here; this server serves "
                                             f"{self.model_name!r}", "invalid_request_error", "model",
                                             "model_not_found"), 404, {})
        return JSONResponse(self.model_card())

    async def _no_route(self, request: Request, exc: Exception) -> Response:
        """An unknown route or method: OpenAI's error body (the SDKs show its message), naming the routes."""
        status = getattr(exc, "status_code", 404)
        what = "method not allowed on" if status == 405 else "no route"
        body = error_json(f"{what} {request.method} {request.url.path}; this server has: " + ", ".join(self.routes),
                          "invalid_request_error", None, "unknown_url" if status == 404 else "method_not_allowed")
        return _json_response(body, status, dict(getattr(exc, "headers", None) or {}))  # 405 keeps its Allow

    def model_card(self) -> dict:
        s = self.scheduler
        m, lim = s.engine.manifest, s.limits
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "lstmgen", "lstmgen": {
            "level": m.level, "vocab_size": m.vocab_size, "num_layers": m.num_layers,
            "hidden_size": m.hidden_size, "quantization": m.quantization, "execution_provider": s.engine.provider,
            "model_sha256": m.model_sha256, "example_prompt": example_prompt(m.vocab), "limits": {
                "max_prompt_chars": lim.max_prompt_chars, "max_tokens": lim.max_new_tokens,
                "default_max_tokens": lim.default_new_tokens, "max_stop_sequences": lim.max_stop_sequences,
                "max_logprobs": lim.max_top_logprobs, "min_temperature": MIN_TEMPERATURE,
                "max_request_output": lim.max_request_output, "max_unread_output": lim.max_unread_output}}}

    def _refuse(self, request: Request) -> Response | None:
        """401 unless the request carries exactly the server's `Authorization: Bearer` token."""
        if self._token is None:
            return None
        values = request.headers.getlist("authorization")
        scheme, _, token = (values[0] if len(values) == 1 else "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token):
            return None
        error = Unauthenticated("missing or wrong token: send the header 'Authorization: Bearer <token>'")
        self.metrics.refused(status_for(error).name, "unauthenticated")
        rid = request_id(((REQUEST_ID_KEY, request.headers.get(REQUEST_ID_KEY)),))
        log.info("call refused request_id=%s path=%s status=UNAUTHENTICATED", rid, request.url.path,
                 extra={"request_id": rid})
        return JSONResponse(error_json(str(error), "authentication_error", None, "invalid_api_key"),
                            status_code=401, headers={REQUEST_ID_KEY: rid, "WWW-Authenticate": "Bearer"})

    # -- completions -----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionFormat, lambda body, rid: parse_completion(body, rid))

    async def chat(self, request: Request) -> Response:
        def parse(body: object, rid: str) -> CompletionRequest:
            return parse_completion(chat_to_completion(body, self.chat_template), rid)
        return await self._complete(request, ChatFormat, parse)

    async def _complete(self, request: Request, fmt: type, parse) -> Response:
        """One completion (or chat completion: `fmt` writes the bodies, `parse` reads the request)."""
        refused = self._refuse(request)
        if refused is not None:
            return refused
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
        call = _Call(self, rid)
        headers = {REQUEST_ID_KEY: call.rid}
        try:
            if isinstance(body, Exception):
                raise body
            creq = parse(body, call.rid)
            self._submit(call, creq)
        except Exception as e:
            status, body = call.failed(e, fmt.param)
            call.end()
            return _json_response(body, status, headers)
        if creq.stream:
            return _EventStream(self._events(call, creq, fmt), headers)
        try:
            body = await _unless_disconnected(request, self._collect(call, creq, fmt))
        except _Disconnected:
            call.end()  # status stays CANCELLED
            return Response(status_code=499)  # nobody reads it
        except Exception as e:
            status, body = call.failed(e)
            call.end()
            return _json_response(body, status, headers)
        call.status = "OK"
        call.end()
        return _json_response(body, 200, headers)

    async def _json(self, request: Request) -> object:
        if "content-length" in request.headers and "transfer-encoding" in request.headers:
            raise InvalidRequest("body", "framed twice: a request may not carry both Content-Length and "
                                         "Transfer-Encoding (RFC 9112, 6.1)")
        limit = self.scheduler.limits.max_request_bytes or request_bytes_for(self.scheduler.limits.max_prompt_chars)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _TooLarge(int(declared), limit)
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise _TooLarge(len(data), limit)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:  # a 5,000-digit integer is a ValueError too
            raise InvalidRequest("body", f"is not valid JSON ({e})") from None
        except RecursionError:
            raise InvalidRequest("body", "nests arrays or objects too deeply to be a completion request") from None

    def _submit(self, call: _Call, creq: CompletionRequest) -> None:
        """Admit every choice or none: a refusal cancels the ones already admitted."""
        if creq.model not in (None, self.model_name):
            raise _ModelNotFound(creq.model, self.model_name)
        prompts = len(creq.choices) // creq.n
        if not creq.stream:
            self._check_output(creq, prompts)
        for i, req in enumerate(creq.choices):
            try:
                call.streams.append(self.scheduler.submit(req))
            except GenerationError as e:
                for stream in call.streams:  # a refused request holds nothing (and counts as a rejection)
                    stream.cancel()
                call.streams.clear()
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

    async def _merged(self, call: _Call) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) from every choice's stream as they come; each stream is paced as a
        gRPC stream is (ServiceConfig), so tokens made meanwhile ride in one event. The queue is
        bounded: a client that stops reading stops the pumps, so its streams' rows park (Stream)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(call.streams))

        async def pump(i: int, stream: Stream) -> None:
            try:
                async for chunk in stream:
                    await queue.put((i, chunk, None))
                    if chunk.finished is None:
                        await pace(self.scheduler, self.cfg, stream)
                await queue.put((i, None, None))
            except Exception as e:  # the stream's error: the whole completion ends with it
                await queue.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(call.streams)]
        try:
            left = len(tasks)
            while left:
                i, chunk, error = await queue.get()
                if error is not None:
                    raise error
                if chunk is None:
                    left -= 1
                    continue
                call.took(chunk)
                yield i, chunk
        finally:
            for t in tasks:
                t.cancel()

    async def _collect(self, call: _Call, creq: CompletionRequest, fmt) -> dict:
        k = len(call.streams)
        texts, lps, finished = [[] for _ in range(k)], [[] for _ in range(k)], [None] * k
        merged = self._merged(call)
        try:
            async for i, chunk in merged:
                texts[i].append(chunk.text)
                lps[i].extend(chunk.logprobs)
                finished[i] = chunk.finished or finished[i]
        finally:
            await merged.aclose()
        choices = [fmt.choice(i, "".join(texts[i]), lps[i] if creq.logprobs is not None else None, finished[i])
                   for i in range(k)]
        return {**self._head(call, fmt, fmt.whole), "choices": choices, "usage": usage_json(finished, creq.n)}

    def _head(self, call: _Call, fmt, kind: str) -> dict:
        return {"id": f"{fmt.id_prefix}-{call.rid}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None}

    async def _events(self, call: _Call, creq: CompletionRequest, fmt) -> AsyncIterator[bytes]:
        """Server-sent events: one per chunk, then the usage (when asked) and `[DONE]`. An error
        after the stream started arrives as an event holding the error body."""
        finished: list = [None] * len(call.streams)
        offsets = [0] * len(call.streams)
        merged = self._merged(call)
        try:
            async for i, chunk in merged:
                finished[i] = chunk.finished
                lps = list(chunk.logprobs) if creq.logprobs is not None else None
                choice = fmt.delta(i, chunk.text, lps, offsets[i], chunk.finished)
                offsets[i] += len(chunk.text)
                yield _sse({**self._head(call, fmt, fmt.chunk), "choices": [choice]})
            if creq.include_usage:
                yield _sse({**self._head(call, fmt, fmt.chunk), "choices": [], "usage": usage_json(finished, creq.n)})
            yield b"data: [DONE]\n\n"
            call.status = "OK"
        except Exception as e:
            _status, body = call.failed(e, fmt.param)
            yield _sse(body)
        finally:
            await merged.aclose()
            call.end()


def example_prompt(vocab) -> str:
    """A prompt the playground can start with that this model can read: a speaker's name for a
    Shakespeare char model, a common word for a word model, else the vocabulary's first symbols."""
    for text in ("ROMEO:", "First Citizen:", "The ", "the", "\n"):
        try:
            if vocab.encode(text, on_unknown="error"):
                return text
        except ValueError:
            continue
    pieces = [vocab.piece(i) for i in range(min(len(vocab), 8))]
    return next((p for p in pieces if p.strip()), pieces[0] if pieces else "")


def _dumps(obj: dict) -> bytes:
    """UTF-8 JSON; escaped (ASCII) when a string holds a lone surrogate (an unknown key "\\ud800"
    quoted in an error message), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj).encode()


def _json_response(body: dict, status: int, headers: dict[str, str]) -> Response:
    return Response(_dumps(body), status_code=status, headers=headers, media_type="application/json")


def _sse(obj: dict) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


class _TooLarge(Overloaded):
    """A body over --max-request-bytes: 413, counted as gRPC counts it (RESOURCE_EXHAUSTED)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"request body of {size} bytes is over the limit of {limit} (--max-request-bytes)")


class _ModelNotFound(InvalidRequest):
    def __init__(self, asked: str, served: str):
        super().__init__("model", f"{asked!r} is not served here; this server serves {served!r} (GET /v1/models)")


_HTTP_SPECIAL = {_TooLarge: 413, _ModelNotFound: 404}


class _Disconnected(Exception):
    pass


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Run `work` unless the client disconnects first (then _Disconnected; `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Disconnected()
    return task.result()


class _EventStream:
    """An ASGI text/event-stream response that stops the event source as soon as the client
    disconnects, even while no event is due (a queued request writes nothing for a while)."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]):
        self.events, self.headers = events, headers

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")] + [(k.encode(), v.encode()) for k, v in self.headers.items()]
        try:
            async with anyio.create_task_group() as tg:
                async def body() -> None:
                    try:
                        await send({"type": "http.response.start", "status": 200, "headers": headers})
                        async for event in self.events:
                            await send({"type": "http.response.body", "body": event, "more_body": True})
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:  # the connection broke while writing
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(body)
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.events.aclose()  # runs the source's finally: streams cancelled, call counted
