"""The HTTP edge: an OpenAI-compatible API and the playground page, on the gRPC server's scheduler.

`lstmgen serve BUNDLE --http-port P` adds, in the same process and on the same Scheduler (one
model, one batch shared with the gRPC streams):

    POST /v1/completions   OpenAI completions (serve/openai_compat.py); `stream` sends server-sent events
    POST /v1/chat/completions  the same through a chat template (serve/openai_chat.py)
    GET  /v1/models        the one model, with its sizes and the server's limits under "lstmgen"
    GET  /health           200 while serving, 503 once stopping (no token needed)
    GET  /                 the playground page (serve/playground/index.html; no token needed to load it)

Errors map from the gRPC status of the same error (service.status_for), so both edges refuse alike:
bad field -> 400 naming it in "param", full -> 429, stopping -> 503, no/wrong token -> 401. Each
completion is one stream in the metrics (open streams, time to first token when streamed, status,
rejections) and one access line with its request id (`X-Request-Id`, echoed). A client that
disconnects cancels its choices, freeing their rows at the next step, as a gRPC cancel does.
This module holds the app and its small routes; the completions handler is
serve/http_completions.py and the server-sent events writer serve/http_events.py.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lstmgen.serve.errors import Unauthenticated
from lstmgen.serve.http_completions import Completions, json_response
from lstmgen.serve.metrics import Metrics
from lstmgen.serve.openai_chat import ChatFormat, ChatTemplate, chat_to_completion
from lstmgen.serve.openai_compat import CompletionFormat, CompletionRequest, error_json, parse_completion
from lstmgen.serve.params import MIN_TEMPERATURE
from lstmgen.serve.scheduler import Scheduler
from lstmgen.serve.service import REQUEST_ID_KEY, ServiceConfig, request_id, status_for
from lstmgen.text import encode

log = logging.getLogger("lstmgen.http")
PLAYGROUND = Path(__file__).parent / "playground" / "index.html"


class HttpApi:
    def __init__(self, scheduler: Scheduler, model_name: str, metrics: Metrics | None = None,
                 cfg: ServiceConfig = ServiceConfig(), token: str | None = None,
                 chat_template: ChatTemplate = ChatTemplate()):
        self.scheduler, self.model_name, self.cfg = scheduler, model_name, cfg
        self.chat_template = chat_template
        self.metrics = metrics or Metrics()
        self._token = token.encode() if token else None
        self.stopping = False  # /health answers 503 once set
        self._complete = Completions(scheduler, model_name, self.metrics, cfg)
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
            return json_response(error_json(f"model {asked!r} is not served here; this server serves "
                                            f"{self.model_name!r}", "invalid_request_error", "model",
                                            "model_not_found"), 404, {})
        return JSONResponse(self.model_card())

    async def _no_route(self, request: Request, exc: Exception) -> Response:
        """An unknown route or method: OpenAI's error body (the SDKs show its message), naming the routes."""
        status = getattr(exc, "status_code", 404)
        what = "method not allowed on" if status == 405 else "no route"
        body = error_json(f"{what} {request.method} {request.url.path}; this server has: " + ", ".join(self.routes),
                          "invalid_request_error", None, "unknown_url" if status == 404 else "method_not_allowed")
        return json_response(body, status, dict(getattr(exc, "headers", None) or {}))  # 405 keeps its Allow

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

    # -- completions (serve/http_completions.py) ---------------------------------------------------
    async def completions(self, request: Request) -> Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        return await self._complete(request, CompletionFormat, parse_completion)

    async def chat(self, request: Request) -> Response:
        refused = self._refuse(request)
        if refused is not None:
            return refused

        def parse(body: object, rid: str) -> CompletionRequest:
            return parse_completion(chat_to_completion(body, self.chat_template), rid)
        return await self._complete(request, ChatFormat, parse)


def example_prompt(vocab) -> str:
    """A prompt the playground can start with that this model can read: a speaker's name for a
    Shakespeare char model, a common word for a word model, else the vocabulary's first symbols."""
    for text in ("ROMEO:", "First Citizen:", "The ", "the", "\n"):
        try:
            enc = encode(vocab, text)
        except ValueError:  # UnknownTokensError
            continue
        if enc.ids.size and not enc.unknown:  # read whole, not as <unk>
            return text
    pieces = [vocab.piece(i) for i in range(min(len(vocab), 8))]
    return next((p for p in pieces if p.strip()), pieces[0] if pieces else "")
