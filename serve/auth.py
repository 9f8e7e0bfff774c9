"""Optional bearer-token auth (`lstmgen serve --auth-token-file FILE`), as a grpc.aio interceptor.

Calls must carry exactly one `authorization: Bearer <token>` metadata entry, else they end with
UNAUTHENTICATED before the handler runs (two entries are refused: which one a proxy or server reads
is not defined). Health checks stay open: load balancers probe without credentials. So does
reflection: it tells only the schema (the .proto files, public in the repository), and tools such as
grpcurl must read it before they can send a token-carrying call or even find grpc.health.v1.Health.
Use it with TLS: over plain TCP the token travels in clear text.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Callable

import grpc

from lstmgen.errors import UsageError
from lstmgen.serve.errors import Unauthenticated
from lstmgen.serve.service import REQUEST_ID_KEY, request_id, status_for

log = logging.getLogger("lstmgen.auth")
# Prefixes of the methods that need no token: health, and reflection under both of its names
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/",
                "/grpc.reflection.v1alpha.ServerReflection/")


def read_token(path: str | Path) -> str:
    """The token is the file's content without surrounding whitespace; empty is an error."""
    token = Path(path).read_text().strip()
    if not token or any(ch.isspace() for ch in token) or not token.isascii():
        raise UsageError(f"{path}: the auth token must be one non-empty line of ASCII without spaces")
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    """`on_reject(status, reason)` is called once per refused call, for the metrics."""

    def __init__(self, token: str, on_reject: Callable[[str, str], None] = lambda status, reason: None):
        self._want = token.encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        problem = self._problem(details.invocation_metadata)
        handler = await continuation(details)
        if problem is None or handler is None:  # None: unknown method, gRPC answers UNIMPLEMENTED
            return handler
        error = Unauthenticated(problem)
        rid = request_id(details.invocation_metadata)
        self._on_reject(status_for(error).name, "unauthenticated")
        log.info("call refused request_id=%s method=%s status=UNAUTHENTICATED error=%r", rid, details.method,
                 problem, extra={"request_id": rid})
        return _deny(handler, error, rid)

    def _problem(self, metadata) -> str | None:
        """Why the call's credentials are refused, or None when they are right."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) > 1:
            return (f"the call carries {len(values)} 'authorization' metadata entries; "
                    "send exactly one: 'authorization: Bearer <token>'")
        scheme, _, token = (values[0] if values and isinstance(values[0], str) else "").partition(" ")
        # compare_digest: the time taken does not tell how much of the token matched
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._want):
            return None
        return "missing or wrong token: send the metadata 'authorization: Bearer <token>'"


def _deny(handler: grpc.RpcMethodHandler, error: Unauthenticated, rid: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts, echoing the request id as every
    call does (REQUEST_ID_KEY in the trailing metadata)."""
    code, message = status_for(error), str(error)

    async def abort(request_or_iterator, context):
        await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, rid),))

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)
