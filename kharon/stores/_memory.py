"""An in-process store: a dict projection and a list event log.

It keeps nothing on disk and serves one Trio run at a time. It exists for
tests, notebooks and examples, and is trusted only because it passes the same
contract suite as the SQLite store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self, TypeVar

import trio

from kharon._commands import (
    DeleteCommand,
    ExpireCommand,
    LeaseCommand,
    LeaseResult,
    PutCommand,
    SettleCommand,
)
from kharon._errors import StoreClosed
from kharon._events import Event
from kharon._ticket import Ticket, TicketStatus, copy_ticket
from kharon.stores import _engine
from kharon.stores._protocol import Stats, empty_status_counts

__all__ = ["MemoryStore"]

T = TypeVar("T")

_ACTIVE = (TicketStatus.PENDING, TicketStatus.RUNNING)
_FINISHED = (TicketStatus.DONE, TicketStatus.FAILED, TicketStatus.CANCELLED)


class _MemoryTransaction:
    """Applies writes directly and keeps an undo log to roll them back."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._undo: list[tuple[str, Ticket | None, int | None, int | None]] = []
        self._events_before = len(store._events)

    def load(self, ticket_id: str) -> Ticket | None:
        return self._store._tickets.get(ticket_id)

    def last_version(self, ticket_id: str) -> int:
        return self._store._last_version.get(ticket_id, 0)

    def due(self, now: datetime, limit: int) -> list[Ticket]:
        store = self._store
        ready = [t for t in store._tickets.values() if t.status in _ACTIVE and t.runat is not None and t.runat <= now]
        ready.sort(key=lambda t: (t.nice, t.runat, store._put_seq[t.id]))
        return ready[:limit]

    def expired(self, now: datetime, limit: int) -> list[Ticket]:
        found = [
            t
            for t in self._store._tickets.values()
            if t.status in _FINISHED and t.expires_at is not None and t.expires_at <= now
        ]
        found.sort(key=lambda t: (t.expires_at, t.id))
        return found[:limit]

    def next_due_at(self) -> datetime | None:
        instants = [t.runat for t in self._store._tickets.values() if t.status in _ACTIVE and t.runat is not None]
        return min(instants, default=None)

    def append(self, event: Event, ticket: Ticket | None) -> int:
        store = self._store
        seq = len(store._events) + 1
        stored = event.model_copy(update={"seq": seq})
        self._undo.append(
            (
                event.ticket_id,
                store._tickets.get(event.ticket_id),
                store._put_seq.get(event.ticket_id),
                store._last_version.get(event.ticket_id),
            )
        )
        store._events.append(stored)
        store._last_version[event.ticket_id] = event.version
        if ticket is None:
            store._tickets.pop(event.ticket_id, None)
            store._put_seq.pop(event.ticket_id, None)
        else:
            store._tickets[event.ticket_id] = ticket
            if event.kind == "put":
                store._put_seq[event.ticket_id] = seq
        return seq

    def rollback(self) -> None:
        store = self._store
        for ticket_id, previous, put_seq, last_version in reversed(self._undo):
            if previous is None:
                store._tickets.pop(ticket_id, None)
            else:
                store._tickets[ticket_id] = previous
            if put_seq is None:
                store._put_seq.pop(ticket_id, None)
            else:
                store._put_seq[ticket_id] = put_seq
            if last_version is None:
                store._last_version.pop(ticket_id, None)
            else:
                store._last_version[ticket_id] = last_version
        del store._events[self._events_before :]


class MemoryStore:
    """A `Store` kept in memory. Every call runs inline, with no thread hop."""

    def __init__(self) -> None:
        self._tickets: dict[str, Ticket] = {}
        self._put_seq: dict[str, int] = {}
        self._last_version: dict[str, int] = {}
        self._events: list[Event] = []
        self._changed = trio.Event()
        self._change_count = 0
        self._closed = False

    def _run(self, operation: Callable[[_MemoryTransaction], T], *, wakes: bool = True) -> T:
        if self._closed:
            raise StoreClosed("the memory store is closed")
        tx = _MemoryTransaction(self)
        try:
            result = operation(tx)
        except BaseException:
            tx.rollback()
            raise
        if wakes and tx._undo:
            self._wake()
        return result

    async def put(self, commands: Sequence[PutCommand]) -> list[Ticket]:
        await trio.lowlevel.checkpoint()
        return _copies(self._run(lambda tx: _engine.put(tx, commands)))

    async def settle(self, command: SettleCommand) -> Ticket | None:
        await trio.lowlevel.checkpoint()
        return _copy(self._run(lambda tx: _engine.settle(tx, command)))

    async def delete(self, command: DeleteCommand) -> bool:
        await trio.lowlevel.checkpoint()
        return self._run(lambda tx: _engine.delete(tx, command), wakes=False)

    async def lease(self, command: LeaseCommand) -> LeaseResult:
        await trio.lowlevel.checkpoint()
        result = self._run(lambda tx: _engine.lease(tx, command), wakes=False)
        return LeaseResult(_copies(result.tickets), result.next_due_at, _copies(result.exhausted))

    async def expire(self, command: ExpireCommand) -> int:
        await trio.lowlevel.checkpoint()
        return self._run(lambda tx: _engine.expire(tx, command), wakes=False)

    async def get(self, ticket_id: str) -> Ticket | None:
        self._check_open()
        await trio.lowlevel.checkpoint()
        return _copy(self._tickets.get(ticket_id))

    async def history(self, ticket_id: str) -> list[Event]:
        self._check_open()
        await trio.lowlevel.checkpoint()
        return [e.model_copy(deep=True) for e in self._events if e.ticket_id == ticket_id]

    async def events(self, *, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        self._check_open()
        await trio.lowlevel.checkpoint()
        # seq n is at index n - 1: the memory log has no gaps.
        return [e.model_copy(deep=True) for e in self._events[max(after_seq, 0) : max(after_seq, 0) + limit]]

    async def list_tickets(
        self,
        *,
        status: TicketStatus | None = None,
        type: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> list[Ticket]:
        self._check_open()
        await trio.lowlevel.checkpoint()
        rows = sorted(
            (
                t
                for t in self._tickets.values()
                if (status is None or t.status == status)
                and (type is None or t.type == type)
                and (after_id is None or t.id > after_id)
            ),
            key=lambda t: t.id,
        )
        return _copies(rows[:limit])

    async def stats(self) -> Stats:
        self._check_open()
        await trio.lowlevel.checkpoint()
        by_status = empty_status_counts()
        by_type: dict[str, dict[str, int]] = {}
        for ticket in self._tickets.values():
            by_status[ticket.status.value] += 1
            counts = by_type.setdefault(ticket.type, {})
            counts[ticket.status.value] = counts.get(ticket.status.value, 0) + 1
        events_by_kind: dict[str, int] = {}
        for event in self._events:
            events_by_kind[event.kind.value] = events_by_kind.get(event.kind.value, 0) + 1
        return Stats(by_status, by_type, events_by_kind, len(self._events))

    def change_token(self) -> int:
        return self._change_count

    async def wait_for_change(self, since: int | None = None) -> None:
        self._check_open()
        if since is not None and since != self._change_count:
            await trio.lowlevel.checkpoint()
            return
        await self._changed.wait()

    def _wake(self) -> None:
        self._change_count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def close(self) -> None:
        self._closed = True
        # Wake any poller so it notices the closed store at once.
        self._wake()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the memory store is closed")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _copy(ticket: Ticket | None) -> Ticket | None:
    # Callers may mutate what they get (payload dicts); the store keeps its own.
    return None if ticket is None else copy_ticket(ticket)


def _copies(tickets: list[Ticket]) -> list[Ticket]:
    return [copy_ticket(t) for t in tickets]
