"""OpenAI's error JSON, exactly: `{"error": {"message", "type", "param", "code"}}`.

`APIError` is raised anywhere in the server (parsing, tokenizing on the
engine thread, generating) and turned into that body with its HTTP status by
one handler in `app`. Engine errors map to the status a client expects.
Knows nothing about the engine's internals.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from kvscope.engine.errors import (
    BusyError,
    CancelledError,
    InvalidRequestError,
    KVScopeError,
    MemoryBudgetError,
)


class APIError(Exception):
    """An error a client sees: HTTP status + OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


def from_engine(exc: BaseException) -> APIError:
    """The client-facing error for an exception that came back from the engine thread."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, MemoryBudgetError):
        return APIError(503, str(exc), "server_error", code="memory_budget_exceeded")
    if isinstance(exc, (BusyError, CancelledError)):
        return APIError(409 if isinstance(exc, BusyError) else 499, str(exc), "server_error")
    if isinstance(exc, KVScopeError):
        return APIError(500, str(exc), "server_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
