"""The exception tree.

Every error Kharon raises on purpose derives from `KharonError`. Where a builtin
exception has the same meaning, the subclass inherits it too, so callers that
already catch `LookupError` or `ValueError` keep working.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "InvalidTransition",
    "KharonError",
    "LeaseLost",
    "SchemaError",
    "StoreClosed",
    "TicketNotFound",
    "VersionConflict",
]


class KharonError(Exception):
    """Base class of every error raised by Kharon."""


class TicketNotFound(KharonError, LookupError):
    """The ticket does not exist (it was never put, or it was removed)."""

    def __init__(self, ticket_id: str, operation: str | None = None) -> None:
        self.ticket_id = ticket_id
        self.operation = operation
        where = f" (operation {operation!r})" if operation else ""
        super().__init__(f"ticket {ticket_id!r} not found{where}")


class InvalidTransition(KharonError):
    """The operation is not allowed from the ticket's current state.

    Nothing was written: the event log and the projection are unchanged.
    """

    def __init__(
        self,
        ticket_id: str,
        state: str,
        operation: str,
        allowed: Iterable[str],
        reason: str | None = None,
    ) -> None:
        self.ticket_id = ticket_id
        self.state = state
        self.operation = operation
        self.allowed = tuple(sorted(allowed))
        self.reason = reason
        allowed_text = ", ".join(self.allowed) if self.allowed else "none"
        detail = f": {reason}" if reason else ""
        super().__init__(
            f"{operation!r} is not allowed for ticket {ticket_id!r} in state {state!r}{detail}; "
            f"operations allowed from {state!r}: {allowed_text}"
        )


class LeaseLost(KharonError):
    """A settle call carried a lease that is no longer the ticket's current lease.

    The lease expired and another worker leased the ticket again (or it was put
    again), so the call was rejected and changed nothing.
    """

    def __init__(self, ticket_id: str, lease: int, current: int, operation: str, detail: str | None = None) -> None:
        self.ticket_id = ticket_id
        self.lease = lease
        self.current = current
        self.operation = operation
        reason = detail or f"the ticket is now on lease {current}"
        super().__init__(
            f"{operation!r} of ticket {ticket_id!r} rejected: lease {lease} is stale ({reason}); "
            "the ticket was leased or put again since, so this call changed nothing"
        )


class VersionConflict(KharonError):
    """The ticket changed between a read and the write that depended on it."""

    def __init__(self, ticket_id: str, expected: int, actual: int | None) -> None:
        self.ticket_id = ticket_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"ticket {ticket_id!r} changed concurrently: expected version {expected}, "
            f"found {actual if actual is not None else 'no ticket'}"
        )


class SchemaError(KharonError):
    """The database is not a Kharon database, or its schema is newer than this code."""


class StoreClosed(KharonError, RuntimeError):
    """The store was used after `close()`."""
