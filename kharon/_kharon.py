"""`Kharon`: the facade that turns each call into one store command."""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

import trio

from kharon._commands import UNSET, DeleteCommand, PutCommand, SettleCommand, SettleOperation
from kharon._errors import LeaseLost, TicketNotFound, VersionConflict
from kharon._events import Event
from kharon._lifecycle import decide_settle, fold
from kharon._router import Router
from kharon._settings import Settings
from kharon._ticket import (
    NICE_MAX,
    NICE_MIN,
    Delay,
    Ticket,
    as_delay,
    check_identifier,
    copy_ticket,
    normalize_error_reason,
    normalize_json,
)
from kharon._time import Clock, SystemClock
from kharon.stores._protocol import Stats, Store

__all__ = ["Delivery", "Kharon", "Update", "current_delivery"]

logger = logging.getLogger("kharon.tickets")

# `update=` callables: receive a copy of the ticket and edit it in place.
Update = Callable[[Ticket], Awaitable[None] | None]

# How often an `update=` settle call re-reads and retries after a concurrent change.
_UPDATE_ATTEMPTS = 8

# Fields an `update=` callable may change; any other change raises ValueError.
_EDITABLE = ("payload", "nice", "runat", "error_reason")
_FIXED = (
    "id",
    "type",
    "status",
    "attempts",
    "version",
    "created_at",
    "updated_at",
    "expires_at",
    "lease_version",
)
# A put starts a new lifecycle with no error reason, so its `update=` may edit
# only what the put stores.
_PUT_EDITABLE = ("payload", "nice", "runat")
_PUT_FIXED = (*_FIXED, "error_reason")


@dataclass(frozen=True, slots=True)
class Delivery:
    """The lease a handler is running under; settle calls inside it carry it."""

    ticket_id: str
    attempts: int
    lease_version: int
    worker: str


_delivery: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar("kharon_delivery", default=None)


def current_delivery() -> Delivery | None:
    """Return the delivery of the handler running in this task, if any."""
    return _delivery.get()


def default_actor() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Kharon:
    """Puts, settles and reads tickets, and runs the workers that handle them.

    Every method is a coroutine for Trio. Each call that changes a ticket
    appends exactly one event, and returns once the event is committed.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings | None = None,
        *,
        clock: Clock | None = None,
        actor: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"settings must be a kharon.Settings, got {type(settings).__name__}")
        self.store = store
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        # Recorded on the events of calls made outside handlers.
        self.actor = default_actor() if actor is None else check_identifier(actor, "actor")
        self._rng = rng or random.Random()
        # (poller nursery, handler host) cancel scopes of each running `run`.
        self._run_scopes: set[tuple[trio.CancelScope, trio.CancelScope]] = set()

    # -- putting -------------------------------------------------------------

    async def put(
        self,
        ticket: Ticket,
        *,
        delay: Delay | None = None,
        nice: int | None = None,
        update: Update | None = None,
    ) -> Ticket:
        """Put `ticket` as pending; an existing pending or finished ticket starts over.

        `delay` sets runat to now + delay; `nice` replaces the ticket's nice;
        `update` then edits a copy. Raise `InvalidTransition` when the ticket
        is running. Return the stored ticket.
        """
        command = await self._put_command(ticket, delay=delay, nice=nice, update=update)
        (stored,) = await self.store.put([command])
        return stored

    async def put_many(self, tickets: Iterable[Ticket]) -> list[Ticket]:
        """Put several tickets in one transaction: all are stored, or none."""
        commands = [await self._put_command(t) for t in tickets]
        if not commands:
            return []
        return await self.store.put(commands)

    async def _put_command(
        self,
        ticket: Ticket,
        *,
        delay: Delay | None = None,
        nice: int | None = None,
        update: Update | None = None,
    ) -> PutCommand:
        if not isinstance(ticket, Ticket):
            raise TypeError(f"expected a kharon.Ticket, got {type(ticket).__name__} {ticket!r}")
        now = self.clock.now()
        # normalize_json validates nested data the caller may have mutated in
        # place since the ticket was built, and returns a private copy of it.
        changes: dict[str, Any] = {"payload": normalize_json(ticket.payload, "payload"), "error_reason": None}
        strategy = as_delay(delay)
        if strategy is not None:
            changes["runat"] = now + strategy.compute(0, self._rng.random())
        if nice is not None:
            changes["nice"] = _check_nice(nice)
        final = ticket.model_copy(update=changes)
        if update is not None:
            draft = copy_ticket(final)
            await _call_update(update, draft)
            # A put always stores a pending ticket with attempts 0, so a
            # changed status or attempts would be dropped without a word.
            _check_fixed_fields(final, draft, _PUT_FIXED, _PUT_EDITABLE)
            final = Ticket.model_validate(draft.model_dump())
        return PutCommand(final, now, self.actor)

    # -- reading -------------------------------------------------------------

    async def get(self, ticket_id: str) -> Ticket:
        """Return the ticket; raise `TicketNotFound` when it does not exist."""
        check_identifier(ticket_id, "ticket id")
        ticket = await self.store.get(ticket_id)
        if ticket is None:
            raise TicketNotFound(ticket_id, "get")
        return ticket

    async def history(self, ticket_id: str) -> list[Event]:
        """Return every event of the ticket in order, also after it was removed."""
        check_identifier(ticket_id, "ticket id")
        return await self.store.history(ticket_id)

    async def stats(self) -> Stats:
        return await self.store.stats()

    # -- removing ------------------------------------------------------------

    async def delete(self, ticket_id: str) -> bool:
        """Remove the ticket in any state; return False if it did not exist."""
        check_identifier(ticket_id, "ticket id")
        return await self.store.delete(DeleteCommand(ticket_id, self.clock.now(), self._actor()))

    # -- settling ------------------------------------------------------------

    async def ack(
        self,
        ticket_id: str,
        *,
        keep: bool = False,
        delay: Delay | None = None,
        nice: int | None = None,
        error_reason: Any = None,
        update: Update | None = None,
        lease: int | None = None,
    ) -> Ticket | None:
        """Acknowledge success: remove the ticket, or keep it as done (with a TTL when `delay`)."""
        return await self._settle(SettleOperation.ACK, ticket_id, keep, delay, nice, error_reason, update, lease)

    async def done(
        self,
        ticket_id: str,
        *,
        delay: Delay | None = None,
        nice: int | None = None,
        error_reason: Any = None,
        update: Update | None = None,
        lease: int | None = None,
    ) -> Ticket | None:
        """Mark the ticket done and keep it; `delay` is the TTL after which it is removed."""
        return await self._settle(SettleOperation.DONE, ticket_id, True, delay, nice, error_reason, update, lease)

    async def fail(
        self,
        ticket_id: str,
        *,
        error_reason: Any = None,
        delay: Delay | None = None,
        nice: int | None = None,
        update: Update | None = None,
        lease: int | None = None,
    ) -> Ticket | None:
        """Mark the ticket failed and keep it; `delay` is the TTL after which it is removed."""
        return await self._settle(SettleOperation.FAIL, ticket_id, True, delay, nice, error_reason, update, lease)

    async def cancel(
        self,
        ticket_id: str,
        *,
        keep: bool = False,
        error_reason: Any = None,
        delay: Delay | None = None,
        nice: int | None = None,
        update: Update | None = None,
        lease: int | None = None,
    ) -> Ticket | None:
        """Cancel: remove the ticket, or keep it as cancelled (with a TTL when `delay`).

        The error reason is recorded in the event even when the ticket is removed.
        """
        return await self._settle(SettleOperation.CANCEL, ticket_id, keep, delay, nice, error_reason, update, lease)

    async def retry(
        self,
        ticket_id: str,
        *,
        delay: Delay | None = None,
        nice: int | None = None,
        error_reason: Any = None,
        update: Update | None = None,
        lease: int | None = None,
    ) -> Ticket | None:
        """Make the ticket pending again, due after `delay` (default: backoff on its attempts)."""
        if delay is None:
            delay = self.settings.backoff
        return await self._settle(SettleOperation.RETRY, ticket_id, True, delay, nice, error_reason, update, lease)

    async def _settle(
        self,
        operation: SettleOperation,
        ticket_id: str,
        keep: bool,
        delay: Delay | None,
        nice: int | None,
        error_reason: Any,
        update: Update | None,
        lease: int | None,
    ) -> Ticket | None:
        check_identifier(ticket_id, "ticket id")
        if nice is not None:
            _check_nice(nice)
        if lease is not None and (isinstance(lease, bool) or not isinstance(lease, int) or lease < 0):
            raise ValueError(f"lease must be a non-negative attempts number, got {lease!r}")
        lease_version: int | None = None
        actor = self._actor()
        delivery = _delivery.get()
        if delivery is not None and delivery.ticket_id == ticket_id and lease is None:
            lease = delivery.attempts
            lease_version = delivery.lease_version

        command = SettleCommand(
            operation=operation,
            ticket_id=ticket_id,
            now=self.clock.now(),
            actor=actor,
            lease=lease,
            lease_version=lease_version,
            keep=keep,
            delay=as_delay(delay),
            jitter_sample=self._rng.random(),
            nice=nice,
            error_reason=UNSET if error_reason is None else normalize_error_reason(error_reason),
        )
        try:
            if update is None:
                settled = await self.store.settle(command)
            else:
                settled = await self._settle_with_update(command, update)
        except LeaseLost as exc:
            logger.warning("lease lost: %s", exc)
            raise
        if operation is SettleOperation.RETRY and settled is not None:
            logger.warning(
                "ticket %s retried after attempt %d, due at %s: %s",
                ticket_id,
                settled.attempts,
                settled.runat.isoformat() if settled.runat else "now",
                settled.error_reason if settled.error_reason is not None else "no reason given",
            )
        return settled

    async def _settle_with_update(self, command: SettleCommand, update: Update) -> Ticket | None:
        """Run `update` on a preview of the settled ticket, then write its edits.

        The write carries the version that was read, so an edit based on a
        stale read is never stored: on a concurrent change the whole step
        (read, preview, update) runs again.
        """
        conflict: VersionConflict | None = None
        for _ in range(_UPDATE_ATTEMPTS):
            current = await self.store.get(command.ticket_id)
            now = self.clock.now()
            attempt = replace(command, now=now, expected_version=current.version if current else None)
            # Raises TicketNotFound, LeaseLost or InvalidTransition before the
            # callable runs, exactly as the write would.
            preview_event = decide_settle(current, attempt)
            assert current is not None
            preview = fold(current, preview_event) or copy_ticket(current)
            draft = copy_ticket(preview)
            await _call_update(update, draft)
            _check_fixed_fields(preview, draft, _FIXED, _EDITABLE)
            if draft.runat is None and preview.runat is not None:
                raise ValueError("update may not clear 'runat'; set it to an instant instead")

            edits: dict[str, Any] = {}
            if draft.payload != preview.payload:
                edits["payload"] = normalize_json(draft.payload, "payload")
            if draft.nice != preview.nice:
                edits["nice"] = _check_nice(draft.nice)
            if draft.runat != preview.runat:
                edits["runat"] = draft.runat
            if draft.error_reason != preview.error_reason:
                edits["error_reason"] = normalize_error_reason(draft.error_reason)
            try:
                return await self.store.settle(replace(attempt, **edits))
            except VersionConflict as exc:
                conflict = exc
        # Every attempt lost the race to another writer: report the last conflict.
        assert conflict is not None
        raise conflict

    # -- running -------------------------------------------------------------

    async def run(self, router: Router, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled; see `kharon._worker` for the details."""
        from kharon._worker import run_workers

        await run_workers(self, router, task_status=task_status)

    def cancel_handlers(self) -> None:
        """Stop every running `run` now, without the shutdown grace period.

        Polling stops and running handlers are cancelled at once; their
        tickets are released to pending as on any shutdown, and `run` then
        returns. Use it when a second stop request must not wait for
        `shutdown_grace_period`.
        """
        for scopes in list(self._run_scopes):
            for scope in scopes:
                scope.cancel()

    def _actor(self) -> str:
        delivery = _delivery.get()
        return delivery.worker if delivery is not None else self.actor

    # -- closing -------------------------------------------------------------

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def _check_nice(nice: Any) -> int:
    if isinstance(nice, bool) or not isinstance(nice, int):
        raise ValueError(f"nice must be an integer, got {type(nice).__name__} {nice!r}")
    if not NICE_MIN <= nice <= NICE_MAX:
        raise ValueError(f"nice {nice} is out of range; it must fit a signed 32-bit integer")
    return nice


async def _call_update(update: Update, draft: Ticket) -> None:
    result = update(draft)
    if inspect.isawaitable(result):
        await result


def _check_fixed_fields(before: Ticket, after: Ticket, fields: Iterable[str], editable: Iterable[str]) -> None:
    for name in fields:
        if getattr(before, name) != getattr(after, name):
            raise ValueError(
                f"update may not change {name!r} (from {getattr(before, name)!r} to "
                f"{getattr(after, name)!r}); it may edit {', '.join(editable)}"
            )
