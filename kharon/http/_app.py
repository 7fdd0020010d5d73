"""The ASGI app behind `kharon serve`: routes over one `Kharon` instance.

Request bodies are parsed here rather than by FastAPI, so malformed JSON
(including NaN, the infinities and numbers too large for a float, which
Python's `json` would accept) is a 400 naming the problem instead of a 422.

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
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from kharon import __version__
from kharon._events import Event
from kharon._kharon import Kharon
from kharon._ticket import MAX_DELAY, NICE_MAX, NICE_MIN, Ticket, TicketStatus
from kharon.http._errors import HTTPError, error_response, install_error_handlers
from kharon.http._middleware import BearerAuthMiddleware, BodyLimitMiddleware, RequestLogMiddleware
from kharon.http._models import ErrorBody, Health, NewTicket, StatsBody, TicketPage

__all__ = ["DEFAULT_MAX_BODY_SIZE", "create_app"]

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

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422)
}
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
routes = APIRouter(responses=_ERRORS)


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
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None
    got = "an empty body" if body is None else f"{type(body).__name__} {body!r:.80}"
    raise HTTPError(422, f"invalid request: the body must be a ticket object or a list of them, got {got}")


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
    summary="Put one ticket, or a list of tickets in one transaction",
)
async def put_tickets(request: Request, response: Response, kharon: KharonDependency) -> Ticket | list[Ticket]:
    """Put the ticket object, or every ticket of a list: all are stored or none."""
    parsed = _parse_new_tickets(await _read_json(request))
    now = kharon.clock.now()
    items = parsed if isinstance(parsed, list) else [parsed]
    tickets = []
    for item in items:
        fields: dict[str, Any] = {"type": item.type, "payload": item.payload, "nice": item.nice}
        if item.id is not None:
            fields["id"] = item.id
        if item.delay is not None:
            fields["runat"] = now + timedelta(seconds=item.delay)
        elif item.runat is not None:
            fields["runat"] = item.runat
        tickets.append(Ticket(**fields))

    stored = await kharon.put_many(tickets)
    if isinstance(parsed, list):
        return stored
    response.headers["Location"] = _location(request, stored[0].id)
    return stored[0]


@routes.get("/ticket/{ticket_id}", name="get_ticket", response_model=Ticket, summary="Read a ticket")
async def get_ticket(ticket_id: str, kharon: KharonDependency) -> Ticket:
    return await kharon.get(ticket_id)


@routes.get(
    "/ticket/{ticket_id}/history",
    response_model=list[Event],
    summary="Read every event of a ticket, also after it was removed",
)
async def get_history(ticket_id: str, kharon: KharonDependency) -> list[Event]:
    events = await kharon.history(ticket_id)
    if not events:
        raise HTTPError(404, f"ticket {ticket_id!r} has no history: it was never put", {"ticket_id": ticket_id})
    return events


@routes.post(
    "/ticket/{ticket_id}/cancel",
    response_model=Ticket,
    responses={204: {"description": "Cancelled and removed"}},
    summary="Cancel a pending or running ticket",
)
async def cancel_ticket(
    ticket_id: str,
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
    summary="Make a pending or running ticket due again",
)
async def retry_ticket(ticket_id: str, kharon: KharonDependency, delay: Seconds = None) -> Ticket:
    """Retry the ticket after `delay` seconds; without it, after the backoff on its attempts."""
    ticket = await kharon.retry(ticket_id, delay=_delay(delay))
    assert ticket is not None
    return ticket


@routes.post(
    "/ticket/{ticket_type}/{ticket_id}",
    status_code=202,
    response_model=Ticket,
    openapi_extra=_PAYLOAD_BODY,
    summary="Put a ticket, with the JSON body as its payload",
)
async def put_ticket(
    ticket_type: str,
    ticket_id: str,
    request: Request,
    response: Response,
    kharon: KharonDependency,
    nice: Annotated[int, Query(ge=NICE_MIN, le=NICE_MAX, description="Lower runs first.")] = 0,
    delay: Seconds = None,
) -> Ticket:
    """Put the ticket as pending; an existing pending or finished ticket starts over."""
    payload = await _read_json(request)
    ticket = Ticket(id=ticket_id, type=ticket_type, payload=payload, nice=nice)
    stored = await kharon.put(ticket, delay=_delay(delay))
    response.headers["Location"] = _location(request, stored.id)
    return stored


@routes.delete(
    "/ticket/{ticket_id}",
    status_code=204,
    response_class=Response,
    summary="Remove a ticket in any state; 204 also when it does not exist",
)
async def delete_ticket(ticket_id: str, kharon: KharonDependency) -> Response:
    await kharon.delete(ticket_id)
    return Response(status_code=204)


@routes.get("/tickets", response_model=TicketPage, summary="List tickets by id, one page at a time")
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


@routes.get("/stats", response_model=StatsBody, summary="Count tickets by status and type, and events by kind")
async def get_stats(kharon: KharonDependency) -> StatsBody:
    return StatsBody.from_stats(await kharon.stats())


@routes.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": ErrorBody}},
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
        _check_token(token)
    if isinstance(max_body_size, bool) or not isinstance(max_body_size, int) or max_body_size < 0:
        raise ValueError(f"max_body_size must be a non-negative number of bytes, got {max_body_size!r}")

    app = FastAPI(
        title="Kharon",
        version=__version__,
        description="Durable, delayed tickets: put them, read them and their history, settle them.",
    )
    # Same store, settings and clock, so workers on `kharon` see API writes at once.
    app.state.kharon = Kharon(kharon.store, kharon.settings, clock=kharon.clock, actor=HTTP_ACTOR)
    app.include_router(routes)
    install_error_handlers(app)

    # The last one added runs first.
    app.add_middleware(BodyLimitMiddleware, max_size=max_body_size)
    if token is not None:
        app.add_middleware(BearerAuthMiddleware, token=token, public_paths=PUBLIC_PATHS)
    app.add_middleware(RequestLogMiddleware)
    return app


def _check_token(token: str) -> None:
    # The message never contains the token.
    if not token:
        raise ValueError("the API token must not be empty; pass None to disable authentication")
    if not token.isascii() or not token.isprintable() or any(char.isspace() for char in token):
        raise ValueError("the API token must be printable ASCII without whitespace, as an HTTP header value requires")
