"""Error responses: every error is JSON `{"error": message, "detail": data}`.

The message names the bad value; `detail` carries the same facts as data
(the ticket id, its state, the validation errors) for programs to read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from kharon._errors import (
    InvalidTransition,
    KharonError,
    LeaseLost,
    SchemaError,
    StoreClosed,
    TicketNotFound,
    VersionConflict,
)

__all__ = ["HTTPError", "error_response", "install_error_handlers"]

# At most this many validation errors are spelled out in the message; all of
# them are in `detail`.
_MESSAGE_ERRORS = 3


class HTTPError(Exception):
    """An error raised by the HTTP layer itself, with its status code."""

    def __init__(self, status_code: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.detail = detail


def error_response(
    status_code: int, message: str, detail: Any = None, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse({"error": message, "detail": detail}, status_code=status_code, headers=headers)


def _json_safe(value: Any) -> Any:
    """Return `value` if it is JSON data, else its repr (a validation input may be anything)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _location(loc: Sequence[int | str]) -> str:
    """Spell a pydantic error location: ("query", "nice") as "query parameter 'nice'"."""
    parts = list(loc)
    if parts and parts[0] in ("query", "path", "header") and len(parts) == 2:
        return f"{parts[0]} parameter {parts[1]!r}"
    if parts and parts[0] == "body":
        parts = parts[1:]
        prefix = "body"
    else:
        prefix = ""
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return (prefix + path).lstrip(".") or "body"


def _validation_errors(errors: Sequence[Any]) -> tuple[str, list[dict[str, Any]]]:
    detail = [
        {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
            "input": _json_safe(error.get("input")),
        }
        for error in errors
    ]
    phrases = [
        f"{_location(item['loc'])}: {item['msg']} (got {item['input']!r})"
        for item in detail[:_MESSAGE_ERRORS]
    ]
    more = len(detail) - _MESSAGE_ERRORS
    if more > 0:
        phrases.append(f"and {more} more")
    return "invalid request: " + "; ".join(phrases), detail


async def _request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, detail = _validation_errors(exc.errors())
    return error_response(422, message, detail)


async def _model_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    message, detail = _validation_errors(exc.errors(include_url=False))
    return error_response(422, message, detail)


async def _value_error(request: Request, exc: Exception) -> Response:
    return error_response(400, f"invalid request: {exc}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error_response(exc.status_code, exc.message, exc.detail)


async def _starlette_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route matches {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TicketNotFound)
    return error_response(404, str(exc), {"ticket_id": exc.ticket_id})


async def _invalid_transition(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidTransition)
    detail = {
        "ticket_id": exc.ticket_id,
        "state": exc.state,
        "operation": exc.operation,
        "allowed": list(exc.allowed),
    }
    return error_response(409, str(exc), detail)


async def _lease_lost(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LeaseLost)
    detail = {"ticket_id": exc.ticket_id, "lease": exc.lease, "current": exc.current, "operation": exc.operation}
    return error_response(409, str(exc), detail)


async def _version_conflict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VersionConflict)
    return error_response(409, str(exc), {"ticket_id": exc.ticket_id})


async def _store_unavailable(request: Request, exc: Exception) -> Response:
    return error_response(503, f"store unavailable: {exc}")


async def _kharon_error(request: Request, exc: Exception) -> Response:
    return error_response(500, f"{type(exc).__name__}: {exc}")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into JSON error responses.

    Starlette picks the handler of the nearest class in the exception's MRO,
    so `ValidationError` (a `ValueError`) gets 422 and other `ValueError`s 400.
    Exceptions without a handler reach `RequestLogMiddleware`, which logs them
    and sends a 500 response.
    """
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _model_validation)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(HTTPException, _starlette_http_exception)
    app.add_exception_handler(TicketNotFound, _not_found)
    app.add_exception_handler(InvalidTransition, _invalid_transition)
    app.add_exception_handler(LeaseLost, _lease_lost)
    app.add_exception_handler(VersionConflict, _version_conflict)
    app.add_exception_handler(StoreClosed, _store_unavailable)
    app.add_exception_handler(SchemaError, _store_unavailable)
    app.add_exception_handler(KharonError, _kharon_error)
