"""Routing of tickets to handlers by type."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from kharon._ticket import Ticket, check_identifier

__all__ = ["Handler", "Route", "Router"]

# `async def handler(ticket)`; with a payload model, `async def handler(ticket, payload)`.
Handler = Callable[..., Awaitable[None]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class Route:
    ticket_type: str | None
    handler: Handler
    # When set, the payload is validated into this model before the handler
    # runs and passed as its second argument.
    payload_model: type[BaseModel] | None = None


class Router:
    """Maps ticket types to async handlers.

    A ticket whose type has no route goes to the `not_found` handler. Unless
    one is set, Kharon fails such a ticket with a reason naming the type, so it
    is not retried forever.
    """

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._not_found: Route | None = None

    def route(self, type: str, *, payload: type[BaseModel] | None = None) -> Callable[[H], H]:
        """Register the decorated coroutine function as the handler of `type`."""

        def register(handler: H) -> H:
            self.handle(type, handler, payload=payload)
            return handler

        return register

    def handle(self, type: str, handler: Handler, *, payload: type[BaseModel] | None = None) -> None:
        """Register `handler` for tickets of `type`; a type has at most one handler."""
        check_identifier(type, "route type")
        _check_handler(handler)
        if payload is not None and not (inspect.isclass(payload) and issubclass(payload, BaseModel)):
            raise TypeError(f"payload must be a pydantic model class, got {payload!r}")
        if type in self._routes:
            raise ValueError(f"a handler for ticket type {type!r} is already registered")
        self._routes[type] = Route(type, handler, payload)

    def not_found(self, handler: H) -> H:
        """Set the handler of tickets whose type has no route; usable as a decorator."""
        _check_handler(handler)
        self._not_found = Route(None, handler)
        return handler

    def resolve(self, ticket: Ticket) -> Route | None:
        """Return the route for `ticket`, the not-found route, or None if neither exists."""
        return self._routes.get(ticket.type, self._not_found)

    @property
    def types(self) -> list[str]:
        return sorted(self._routes)


def _check_handler(handler: Any) -> None:
    target = handler.__call__ if not inspect.isroutine(handler) and callable(handler) else handler
    if not inspect.iscoroutinefunction(target):
        raise TypeError(f"handler {handler!r} must be an async function (async def handler(ticket): ...)")
