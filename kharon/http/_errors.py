"""Error responses: every error is JSON `{"error": message, "detail": data}`.

The message names the bad value; `detail` carries the same facts as data
(the ticket id, its state, the validation errors) for programs to read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import to_jsonable_python
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

__all__ = ["HTTPError", "error_response", "install_error_handlers", "relocated", "validation_error"]

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


# A value shown in an error message is cut to this many characters of JSON;
# `detail` carries the whole value.
_SHOWN_VALUE_LENGTH = 60

# A lone surrogate: valid in a Python string, and in a JSON body as an escape
# such as "\ud800", but not encodable as UTF-8, so a response cannot carry it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(text: str) -> str:
    return _LONE_SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _json_text(value: Any) -> str:
    """Spell `value` as JSON, the way the client sent it; other Python objects become strings."""
    try:
        data = to_jsonable_python(value, fallback=str)
    except (TypeError, ValueError):
        # Such as bytes that are not UTF-8; request values are never bytes.
        data = repr(value)
    return _escape_surrogates(json.dumps(data, ensure_ascii=False))


def _shown_value(value: Any) -> str:
    """Spell `value` as JSON for a message, cut after `_SHOWN_VALUE_LENGTH` characters."""
    text = _json_text(value)
    if len(text) > _SHOWN_VALUE_LENGTH:
        return text[:_SHOWN_VALUE_LENGTH] + "…"
    return text


def _detail_value(value: Any) -> Any:
    """Return `value` if a JSON response can carry it unchanged, else its JSON text."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        return _json_text(value)
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


def _error_message(error: Mapping[str, Any]) -> str:
    """Return the message of one pydantic error without pydantic's "Value error, " prefix.

    A validator that raises `ValueError` or `AssertionError` gets that prefix in
    `msg`; the exception itself is in `ctx["error"]`.
    """
    raised = error.get("ctx", {}).get("error")
    if error.get("type") in ("value_error", "assertion_error") and raised is not None:
        return str(raised)
    return str(error.get("msg", ""))


def _sentence(error: Mapping[str, Any]) -> str:
    """Spell one error as "location: message, got value." with the value as JSON."""
    message = _error_message(error).rstrip(".")
    sentence = f"{_location(error.get('loc', ()))}: {message}"
    # For a missing field the input is the enclosing object, not the field.
    if error.get("type") != "missing":
        sentence += f", got {_shown_value(error.get('input'))}"
    return sentence + "."


def _validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    detail = [
        {
            "loc": list(error.get("loc", ())),
            "msg": _escape_surrogates(_error_message(error)),
            "type": error.get("type", ""),
            "input": _detail_value(error.get("input")),
        }
        for error in errors
    ]
    sentences = [_escape_surrogates(_sentence(error)) for error in errors[:_MESSAGE_ERRORS]]
    more = len(errors) - _MESSAGE_ERRORS
    if more > 0:
        sentences.append(f"And {more} more {'error' if more == 1 else 'errors'}, listed in detail.")
    return "invalid request: " + " ".join(sentences), detail


def validation_error(
    loc: tuple[int | str, ...], message: str, value: Any, kind: str = "value_error"
) -> RequestValidationError:
    """Build the `RequestValidationError` (status 422) of one invalid request value."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind, "input": value}])


def relocated(
    exc: ValidationError, prefix: tuple[int | str, ...], renames: Mapping[str, tuple[int | str, ...]]
) -> RequestValidationError:
    """Turn the errors of a model built from request values into a `RequestValidationError`.

    `renames` maps a model field to the location of the request value it came
    from, and replaces the first part of a matching error location. Every
    other location gets `prefix` in front.
    """
    errors = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        target = renames.get(loc[0]) if loc and isinstance(loc[0], str) else None
        errors.append({**error, "loc": (*prefix, *loc) if target is None else (*target, *loc[1:])})
    return RequestValidationError(errors)


async def _request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, detail = _validation_errors(exc.errors())
    return error_response(422, message, detail)


async def _model_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    message, detail = _validation_errors(exc.errors(include_url=False))
    return error_response(422, message, detail)


async def _value_error(request: Request, exc: Exception) -> Response:
    # The routes check their arguments first, so this is only a safety net for
    # a value that Kharon rejects with ValueError. It is a validation error too.
    return error_response(422, f"invalid request: {exc}")


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
    so `ValidationError` (a `ValueError`) gets its own handler.
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
