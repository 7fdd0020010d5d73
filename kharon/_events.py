"""Events: the append-only record of every change to every ticket."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from kharon._ticket import TicketStatus

__all__ = ["EVENT_SCHEMA_VERSION", "Event", "EventKind"]

# Version of the `changes` layout. Bump it when the meaning of a key changes, so
# a replay can tell old events from new ones.
EVENT_SCHEMA_VERSION = 1


class EventKind(enum.StrEnum):
    """The operation an event records; one kind per row of the transition table."""

    PUT = "put"
    LEASE = "lease"
    RETRY = "retry"
    DONE = "done"
    FAIL = "fail"
    ACK = "ack"
    CANCEL = "cancel"
    EXPIRE = "expire"
    DELETE = "delete"


class Event(BaseModel):
    """One change to one ticket, as appended to the log.

    `changes` contains the ticket fields the event set, in JSON form (instants are
    ISO 8601 strings in UTC). Folding a ticket's events in `version` order with
    `kharon.fold` rebuilds its projection row exactly.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Global position in the log, assigned by the store; None before it is stored.
    seq: int | None = None
    ticket_id: str
    # Per-ticket sequence number, 1 for the first event ever recorded for this
    # id. The store rejects a second event with the same (ticket_id, version).
    version: int
    kind: EventKind
    at: datetime
    # Who made the change: "worker-2@host:pid" for a worker, or what the caller
    # passed as `actor` (the HTTP API uses "http", the CLI "cli").
    actor: str | None = None
    # None means the ticket did not exist before (status_before) or was removed
    # by this event (status_after).
    status_before: TicketStatus | None
    status_after: TicketStatus | None
    changes: dict[str, Any]
    schema_version: int = EVENT_SCHEMA_VERSION

    @property
    def removes(self) -> bool:
        """True when the event removes the ticket from the projection."""
        return self.status_after is None
