"""The `Store` protocol: what a backend must provide to Kharon.

A store records; it never decides. Each write method receives a command,
opens one transaction, and hands the command to the shared engine
(`kharon.stores._engine`) together with a `Transaction` view of that
transaction. The engine reads the current row, gets from the lifecycle the one
event to append, and writes the event and the new projection row through the
`Transaction`. So every store appends the same events in the same cases, and
only has to implement row access.

Contract every store passes (`tests/store_contract.py`):

* A write is atomic: the event and the projection row commit together, and a
  raising decision leaves both untouched. `put` of many tickets is one
  transaction: all or none.
* `lease` gives a ticket to at most one caller at a time, across every process
  sharing the store, and returns tickets in poll order: lowest nice, then
  earliest runat, then insertion order.
* The projection equals the fold of the log (`kharon.replay`) at every commit.
* A returned write is durable; a write cancelled before it returned either
  happened completely or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from kharon._commands import (
    DeleteCommand,
    ExpireCommand,
    LeaseCommand,
    LeaseResult,
    PutCommand,
    SettleCommand,
)
from kharon._events import Event
from kharon._ticket import Ticket, TicketStatus

__all__ = ["BatchTransaction", "Stats", "Store", "Transaction"]


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts over the projection and the log."""

    # Tickets in the projection, by status; every status is present.
    by_status: dict[str, int]
    # Tickets in the projection, by type and then status (only non-zero counts).
    by_type: dict[str, dict[str, int]]
    # Events in the log, by kind (only non-zero counts).
    events_by_kind: dict[str, int] = field(default_factory=dict)
    # Global sequence number of the newest event, 0 for an empty log.
    last_seq: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def empty_status_counts() -> dict[str, int]:
    return {status.value: 0 for status in TicketStatus}


class Transaction(Protocol):
    """Row access inside one open store transaction, used by the engine.

    All methods are synchronous: the SQLite and PostgreSQL stores run the
    engine in a worker thread, the memory store inline.
    """

    def load(self, ticket_id: str) -> Ticket | None:
        """Return the projection row of `ticket_id`, locked for update where the backend locks rows."""

    def last_version(self, ticket_id: str) -> int:
        """Return the newest event version recorded for `ticket_id`, 0 if none."""

    def due(self, now: datetime, limit: int) -> list[Ticket]:
        """Return up to `limit` pending or running tickets with runat <= now, in poll order.

        A backend shared by processes must lock the rows it returns and skip
        rows locked by others (PostgreSQL: FOR UPDATE SKIP LOCKED).
        """

    def expired(self, now: datetime, limit: int) -> list[Ticket]:
        """Return up to `limit` done, failed or cancelled tickets with expires_at <= now."""

    def next_due_at(self) -> datetime | None:
        """Return the earliest runat of pending and running tickets, None when there are none."""

    def append(self, event: Event, ticket: Ticket | None) -> int:
        """Append `event` and write `ticket` as the projection row (None removes it).

        Return the global `seq` the store assigned to the event. `event` itself
        is left unchanged (its `seq` stays None), so no copy of it is made.
        """


class BatchTransaction(Transaction, Protocol):
    """A `Transaction` that can also write many changes in one call; optional for stores.

    The engine uses `append_many` for the tickets of one lease poll when the
    transaction has it, and calls `append` once per ticket otherwise.
    """

    def append_many(self, changes: Sequence[tuple[Event, Ticket]]) -> None:
        """Write the changes as `append` called for each (event, ticket) pair in order would.

        The caller passes only existing rows that stay (no put, no removal),
        each ticket at most once.
        """


@runtime_checkable
class Store(Protocol):
    """An event log plus its projection, shared by `Kharon` and its workers."""

    async def put(self, commands: Sequence[PutCommand]) -> list[Ticket]:
        """Put every ticket in one transaction; all or none are stored."""

    async def settle(self, command: SettleCommand) -> Ticket | None:
        """Apply ack, done, fail, cancel or retry; return the ticket, None if removed."""

    async def delete(self, command: DeleteCommand) -> bool:
        """Remove a ticket; return False (and append nothing) if it did not exist."""

    async def lease(self, command: LeaseCommand) -> LeaseResult:
        """Lease due tickets in one transaction."""

    async def expire(self, command: ExpireCommand) -> int:
        """Remove finished tickets whose TTL passed; return how many."""

    async def get(self, ticket_id: str) -> Ticket | None:
        """Return the projection row, None when the ticket does not exist."""

    async def history(self, ticket_id: str) -> list[Event]:
        """Return every event of `ticket_id` in version order, also after removal."""

    async def events(self, *, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Return up to `limit` events of all tickets with seq > after_seq, in seq order."""

    async def list_tickets(
        self,
        *,
        status: TicketStatus | None = None,
        type: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> list[Ticket]:
        """Return projection rows ordered by id, starting after `after_id`."""

    async def stats(self) -> Stats:
        """Return counts over the projection and the log."""

    def change_token(self) -> int:
        """Return a counter that grows each time `wait_for_change` waiters are woken.

        Read it before a poll and pass it to `wait_for_change`, so a write that
        lands between the poll and the wait still wakes the poller.
        """

    async def wait_for_change(self, since: int | None = None) -> None:
        """Return when a write may have made a ticket due.

        Return at once when `since` is given and `change_token()` has moved
        past it. In-process writes wake the waiter at once. Writes by other
        processes are noticed as the backend allows (SQLite: by polling
        `PRAGMA data_version`; PostgreSQL: LISTEN/NOTIFY). It may return
        early; the caller bounds the wait with its own timeout.
        """

    async def close(self) -> None:
        """Release connections and threads; further calls raise `StoreClosed`."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
