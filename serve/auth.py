"""Optional bearer-token auth (`lstmgen serve --auth-token-file FILE`), as a grpc.aio interceptor.

Calls must carry `authorization: Bearer <token>` metadata, else they end with UNAUTHENTICATED
before the handler runs. Health checks stay open: load balancers probe without credentials.
Use it with TLS: over plain TCP the token travels in clear text.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable

import grpc

from lstmgen.serve.errors import Unauthenticated
from lstmgen.serve.service import status_for

OPEN_METHODS = ("/grpc.health.v1.Health/",)  # prefixes of methods that need no token


def read_token(path: str | Path) -> str:
    """The token is the file's content without surrounding whitespace; empty is an error."""
    token = Path(path).read_text().strip()
    if not token or any(ch.isspace() for ch in token) or not token.isascii():
        raise ValueError(f"{path}: the auth token must be one non-empty line of ASCII without spaces")
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_reject: Callable[[], None] = lambda: None):
        self._want = token.encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHODS) or self._allowed(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        self._on_reject()
        return _deny(handler, Unauthenticated(
            "missing or wrong token: send the metadata 'authorization: Bearer <token>'"))

    def _allowed(self, metadata) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str):
            return False
        scheme, _, token = value.partition(" ")
        # compare_digest: the time taken does not tell how much of the token matched
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._want)


def _deny(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts."""
    code, message = status_for(error), str(error)

    async def abort(request_or_iterator, context):
        await context.abort(code, message)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)
