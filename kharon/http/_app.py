"""The ASGI app behind `kharon serve`: routes over one `Kharon` instance.

Request bodies are parsed here rather than by FastAPI, so malformed JSON
(including NaN, the infinities and numbers too large for a float, which
Python's `json` would accept) is a 400 naming the problem. Every value that
parses but is invalid, in the path, the query or the body, is a 422.

NOTE: `POST /ticket/{type}/cancel` and `POST /ticket/{type}/retry` reach the
cancel and retry routes, which are declared first, so a ticket whose id is "cancel" or "retry" cannot
be put through `POST /ticket/{type}/{id}`. `POST /tickets` can put it.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import quote

import trio
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from pydantic import TypeAdapter, ValidationError

from kharon import __version__
from kharon._events import Event
from kharon._kharon import Kharon
from kharon._ticket import MAX_DELAY, NICE_MAX, NICE_MIN, Ticket, TicketStatus
from kharon.http._errors import HTTPError, error_response, install_error_handlers, relocated, validation_error
from kharon.http._middleware import BearerAuthMiddleware, BodyLimitMiddleware, RequestLogMiddleware
from kharon.http._models import ErrorBody, Health, Identifier, NewTicket, StatsBody, TicketPage

__all__ = ["DEFAULT_MAX_BODY_SIZE", "check_token", "create_app"]

logger = logging.getLogger("kharon.http")

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
# Paths served without a token, so load balancers can probe without one.
PUBLIC_PATHS = frozenset({"/healthz"})
# How long /healthz waits for the store before reporting it unavailable.
HEALTH_TIMEOUT_SECONDS = 5.0
MAX_PAGE_SIZE = 1000
CANCEL_REASON = "cancelled via api"
# Events written by API calls record this actor.
HTTP_ACTOR = "http"

Seconds = Annotated[
    float | None,
    Query(ge=0, le=MAX_DELAY.total_seconds(), allow_inf_nan=False, description="Seconds, finite and >= 0."),
]

TicketId = Annotated[Identifier, Path(description="Ticket id.")]
TicketType = Annotated[Identifier, Path(description="Ticket type.")]

_ERROR_DESCRIPTIONS = {
    400: "Malformed JSON body",
    401: "Missing or wrong bearer token",
    404: "Ticket not found",
    409: "Operation not allowed in the ticket's state, or the ticket changed meanwhile",
    413: "Request body larger than the limit",
    422: "Invalid path parameter, query parameter or body value",
    500: "Unexpected error, logged by the server",
    503: "Store closed, or database schema not usable",
}


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI `responses` of the given error status codes."""
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


# Every route that uses the store can fail with these, except /healthz, which turns store errors into 503.
_SERVER_ERRORS = (500, 503)
_PAYLOAD_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {"description": "Any JSON value, stored as the payload. An empty body stores null."}
            }
        },
    }
}
_NEW_TICKETS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        NewTicket.model_json_schema(),
                        {"type": "array", "items": NewTicket.model_json_schema()},
                    ]
                }
            }
        },
    }
}
_new_tickets_adapter: TypeAdapter[list[NewTicket]] = TypeAdapter(list[NewTicket])


def _kharon(request: Request) -> Kharon:
    kharon: Kharon = request.app.state.kharon
    return kharon


KharonDependency = Annotated[Kharon, Depends(_kharon)]
# Routes behind the token, when there is one; `public_routes` need none.
routes = APIRouter()
public_routes = APIRouter()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is too large for a 64-bit float")
    return value


async def _read_json(request: Request) -> Any:
    """Return the parsed body; an empty body is None."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_parse_float)
    except RecursionError:
        raise HTTPError(400, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"malformed JSON body: {exc}") from None


def _parse_new_tickets(body: Any) -> NewTicket | list[NewTicket]:
    """Validate a `POST /tickets` body: one ticket object or a list of them."""
    try:
        if isinstance(body, list):
            return _new_tickets_adapter.validate_python(body)
        if isinstance(body, dict):
            return NewTicket.model_validate(body)
    except ValidationError as exc:
        raise relocated(exc, ("body",), {}) from None
    if body is None:
        message = "must be a ticket object or a list of them, got an empty body"
        raise validation_error(("body",), message, body, "missing")
    raise validation_error(("body",), "must be a ticket object or a list of them", body, "model_type")


def _ticket(fields: dict[str, Any], prefix: tuple[int | str, ...], renames: dict[str, tuple[int | str, ...]]) -> Ticket:
    """Build a Ticket from request values; its validation errors name the request value, as 422."""
    try:
        return Ticket(**fields)
    except ValidationError as exc:
        raise relocated(exc, prefix, renames) from None


def _delay(seconds: float | None) -> timedelta | None:
    return None if seconds is None else timedelta(seconds=seconds)


def _location(request: Request, ticket_id: str) -> str:
    """Return the URL of `GET /ticket/{id}`, with the id percent-encoded.

    It is built by hand because `url_for` rejects ids with "/" and non-Latin-1
    characters, and the ticket is already stored when the header is set.
    NOTE: an id containing "/" is stored, but the path routes cannot address
    it, because the server decodes %2F before routing; `GET /tickets` lists it.
    """
    return f"{str(request.base_url).rstrip('/')}/ticket/{quote(ticket_id, safe='')}"


@routes.post(
    "/tickets",
    status_code=202,
    response_model=Ticket | list[Ticket],
    openapi_extra=_NEW_TICKETS_BODY,
    responses=_error_responses(400, 409, 413, 422, *_SERVER_ERRORS),
    summary="Put one ticket, or a list of tickets in one transaction",
)
async def put_tickets(request: Request, response: Response, kharon: KharonDependency) -> Ticket | list[Ticket]:
    """Put the ticket object, or every ticket of a list: all are stored or none."""
    parsed = _parse_new_tickets(await _read_json(request))
    now = kharon.clock.now()
    items = parsed if isinstance(parsed, list) else [parsed]
    tickets = []
    for index, item in enumerate(items):
        fields: dict[str, Any] = {"type": item.type, "payload": item.payload, "nice": item.nice}
        if item.id is not None:
            fields["id"] = item.id
        if item.delay is not None:
            fields["runat"] = now + timedelta(seconds=item.delay)
        elif item.runat is not None:
            fields["runat"] = item.runat
        prefix: tuple[int | str, ...] = ("body", index) if isinstance(parsed, list) else ("body",)
        tickets.append(_ticket(fields, prefix, {}))

    stored = await kharon.put_many(tickets)
    if isinstance(parsed, list):
        return stored
    response.headers["Location"] = _location(request, stored[0].id)
    return stored[0]


@routes.get(
    "/ticket/{ticket_id}",
    name="get_ticket",
    response_model=Ticket,
    responses=_error_responses(404, 422, *_SERVER_ERRORS),
    summary="Read a ticket",
)
async def get_ticket(ticket_id: TicketId, kharon: KharonDependency) -> Ticket:
    return await kharon.get(ticket_id)


@routes.get(
    "/ticket/{ticket_id}/history",
    response_model=list[Event],
    responses=_error_responses(404, 422, *_SERVER_ERRORS),
    summary="Read every event of a ticket, also after it was removed",
)
async def get_history(ticket_id: TicketId, kharon: KharonDependency) -> list[Event]:
    events = await kharon.history(ticket_id)
    if not events:
        raise HTTPError(404, f"ticket {ticket_id!r} has no history: it was never put", {"ticket_id": ticket_id})
    return events


@routes.post(
    "/ticket/{ticket_id}/cancel",
    response_model=Ticket,
    responses={204: {"description": "Cancelled and removed"}, **_error_responses(404, 409, 422, *_SERVER_ERRORS)},
    summary="Cancel a pending or running ticket",
)
async def cancel_ticket(
    ticket_id: TicketId,
    kharon: KharonDependency,
    keep: Annotated[bool, Query(description="Keep the ticket as cancelled instead of removing it.")] = False,
    reason: Annotated[str, Query(max_length=1000, description="Error reason recorded in the event.")] = CANCEL_REASON,
) -> Ticket | Response:
    """Cancel the ticket: 200 with the ticket when kept, else 204."""
    ticket = await kharon.cancel(ticket_id, keep=keep, error_reason=reason)
    if ticket is None:
        return Response(status_code=204)
    return ticket


@routes.post(
    "/ticket/{ticket_id}/retry",
    response_model=Ticket,
    responses=_error_responses(404, 409, 422, *_SERVER_ERRORS),
    summary="Make a pending or running ticket due again",
)
async def retry_ticket(ticket_id: TicketId, kharon: KharonDependency, delay: Seconds = None) -> Ticket:
    """Retry the ticket after `delay` seconds; without it, after the backoff on its attempts."""
    ticket = await kharon.retry(ticket_id, delay=_delay(delay))
    assert ticket is not None
    return ticket


@routes.post(
    "/ticket/{ticket_type}/{ticket_id}",
    status_code=202,
    response_model=Ticket,
    openapi_extra=_PAYLOAD_BODY,
    responses=_error_responses(400, 409, 413, 422, *_SERVER_ERRORS),
    summary="Put a ticket, with the JSON body as its payload",
)
async def put_ticket(
    ticket_type: TicketType,
    ticket_id: TicketId,
    request: Request,
    response: Response,
    kharon: KharonDependency,
    nice: Annotated[int, Query(ge=NICE_MIN, le=NICE_MAX, description="Lower runs first.")] = 0,
    delay: Seconds = None,
) -> Ticket:
    """Put the ticket as pending; an existing pending or finished ticket starts over."""
    payload = await _read_json(request)
    fields = {"id": ticket_id, "type": ticket_type, "payload": payload, "nice": nice}
    renames: dict[str, tuple[int | str, ...]] = {
        "id": ("path", "ticket_id"),
        "type": ("path", "ticket_type"),
        "payload": ("body",),
        "nice": ("query", "nice"),
    }
    ticket = _ticket(fields, (), renames)
    stored = await kharon.put(ticket, delay=_delay(delay))
    response.headers["Location"] = _location(request, stored.id)
    return stored


@routes.delete(
    "/ticket/{ticket_id}",
    status_code=204,
    response_class=Response,
    responses=_error_responses(422, *_SERVER_ERRORS),
    summary="Remove a ticket in any state; 204 also when it does not exist",
)
async def delete_ticket(ticket_id: TicketId, kharon: KharonDependency) -> Response:
    await kharon.delete(ticket_id)
    return Response(status_code=204)


@routes.get(
    "/tickets",
    response_model=TicketPage,
    responses=_error_responses(422, *_SERVER_ERRORS),
    summary="List tickets by id, one page at a time",
)
async def list_tickets(
    kharon: KharonDependency,
    status: TicketStatus | None = None,
    ticket_type: Annotated[str | None, Query(alias="type", max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100,
    after: Annotated[str | None, Query(max_length=255, description="The `next` cursor of the previous page.")] = None,
) -> TicketPage:
    # Reading one row more than the page shows whether another page follows.
    rows = await kharon.store.list_tickets(status=status, type=ticket_type, limit=limit + 1, after_id=after)
    items = rows[:limit]
    next_cursor = items[-1].id if len(rows) > limit else None
    return TicketPage(items=items, next=next_cursor)


@routes.get(
    "/stats",
    response_model=StatsBody,
    responses=_error_responses(*_SERVER_ERRORS),
    summary="Count tickets by status and type, and events by kind",
)
async def get_stats(kharon: KharonDependency) -> StatsBody:
    return StatsBody.from_stats(await kharon.stats())


@public_routes.get(
    "/healthz",
    response_model=Health,
    # The route turns every store error into 503.
    responses=_error_responses(503),
    summary="Check that the store responds; needs no token",
)
async def healthz(kharon: KharonDependency) -> Health | Response:
    with trio.move_on_after(HEALTH_TIMEOUT_SECONDS):
        try:
            # A lookup by primary key: cheap whatever the size of the store.
            await kharon.store.get("healthz")
        except Exception as exc:
            logger.warning("health check failed: the store raised %r", exc)
            return error_response(503, f"store unavailable: {exc}")
        return Health(status="ok")
    logger.warning("health check failed: the store did not respond within %s s", HEALTH_TIMEOUT_SECONDS)
    return error_response(503, f"store unavailable: no response within {HEALTH_TIMEOUT_SECONDS} s")


def create_app(kharon: Kharon, *, token: str | None = None, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> FastAPI:
    """Build the ASGI app over `kharon`.

    With `token`, every route except /healthz requires the header
    `Authorization: Bearer <token>`. Request bodies over `max_body_size` bytes
    get 413. Events written by API calls record the actor "http"; the app
    never closes `kharon`, so its owner must.
    """
    if token is not None:
        check_token(token)
    if isinstance(max_body_size, bool) or not isinstance(max_body_size, int) or max_body_size < 0:
        raise ValueError(f"max_body_size must be a non-negative number of bytes, got {max_body_size!r}")

    app = FastAPI(
        title="Kharon",
        version=__version__,
        description="Durable, delayed tickets: put them, read them and their history, settle them.",
    )
    # Same store, settings and clock, so workers on `kharon` see API writes at once.
    app.state.kharon = Kharon(kharon.store, kharon.settings, clock=kharon.clock, actor=HTTP_ACTOR)
    # 401 is possible, and listed in the OpenAPI schema, only with a token.
    app.include_router(routes, responses=_error_responses(401) if token is not None else None)
    app.include_router(public_routes)
    install_error_handlers(app)

    # The last one added runs first.
    app.add_middleware(BodyLimitMiddleware, max_size=max_body_size)
    if token is not None:
        app.add_middleware(BearerAuthMiddleware, token=token, public_paths=PUBLIC_PATHS)
    app.add_middleware(RequestLogMiddleware)
    return app


def check_token(token: str) -> None:
    """Raise `ValueError` unless `token` can be an API token; the message never contains it."""
    if not token:
        raise ValueError("the API token must not be empty; pass None to disable authentication")
    if not token.isascii() or not token.isprintable() or any(char.isspace() for char in token):
        raise ValueError("the API token must be printable ASCII without whitespace, as an HTTP header value requires")
