"""Errors the engine side raises; the gRPC edge maps each to one status (serve/service.py)."""
from __future__ import annotations

from lstmgen.errors import UserError


class GenerationError(UserError):
    """Base of every error a request can end with. Statuses are looked up through the class
    hierarchy (service.status_for), so a subclass keeps its parent's status."""


class InvalidRequest(GenerationError):
    """A request field is out of its allowed range -> INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class Overloaded(GenerationError):
    """Admission limits reached -> RESOURCE_EXHAUSTED."""


class Unavailable(GenerationError):
    """The server is stopping -> UNAVAILABLE."""


class StepFailed(GenerationError):
    """The model step for this request failed (runtime error, non-finite logits) -> INTERNAL."""


class Unauthenticated(GenerationError):
    """The call lacks the server's bearer token, or carries a wrong one -> UNAUTHENTICATED."""


class WrongModel(GenerationError):
    """A state made by another model (or for another server setup) -> FAILED_PRECONDITION."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
