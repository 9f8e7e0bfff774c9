"""One exception per gRPC status, from one mapping (as tritonclient's raise_error_grpc)."""
from __future__ import annotations

import grpc


class LstmgenError(Exception):
    """Base of every error the client raises; `code` is the gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(LstmgenError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(LstmgenError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RequestTooLargeError(LstmgenError):
    """The request message is bigger than the server accepts (ModelInfo.limits.max_request_bytes).
    Same status as overload, but retrying the same request cannot help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(LstmgenError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LstmgenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(LstmgenError):
    code = grpc.StatusCode.UNAUTHENTICATED


class CancelledError(LstmgenError):
    code = grpc.StatusCode.CANCELLED


class InternalError(LstmgenError):
    code = grpc.StatusCode.INTERNAL


class FailedPreconditionError(LstmgenError):
    """The request cannot run on this server as it stands, e.g. a state made by another model."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE = {cls.code: cls for cls in (InvalidArgumentError, OverloadedError, UnavailableError,
                                      DeadlineExceededError, UnauthenticatedError, CancelledError,
                                      InternalError, FailedPreconditionError)}


def from_rpc_error(e: grpc.RpcError) -> LstmgenError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    cls = _BY_CODE.get(code, LstmgenError)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        cls = RequestTooLargeError  # gRPC's own message-size check, not the server's admission control
    return cls(f"{code.name}: {details}", code)
