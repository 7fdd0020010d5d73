"""The store engine: turns one command into events, inside one transaction.

Stores call these functions with a `Transaction` bound to an open database
transaction (or the memory store's undo log). The functions read rows, ask
`kharon._lifecycle` for the event, fold it, and write both through
`Transaction.append`. A raised exception must make the store roll back.
"""

from __future__ import annotations

from collections.abc import Sequence

from kharon._commands import (
    DeleteCommand,
    ExpireCommand,
    LeaseCommand,
    LeaseResult,
    PutCommand,
    SettleCommand,
    SettleOperation,
)
from kharon._events import Event
from kharon._lifecycle import decide_delete, decide_expire, decide_lease, decide_put, decide_settle, fold
from kharon._ticket import Ticket
from kharon.stores._protocol import Transaction

__all__ = ["delete", "expire", "lease", "put", "settle"]


def put(tx: Transaction, commands: Sequence[PutCommand]) -> list[Ticket]:
    stored: list[Ticket] = []
    for command in commands:
        current = tx.load(command.ticket.id)
        last_version = current.version if current is not None else tx.last_version(command.ticket.id)
        event = decide_put(current, command, last_version)
        ticket = fold(current, event)
        assert ticket is not None
        tx.append(event, ticket)
        stored.append(ticket)
    return stored


def settle(tx: Transaction, command: SettleCommand) -> Ticket | None:
    current = tx.load(command.ticket_id)
    event = decide_settle(current, command)
    ticket = fold(current, event)
    tx.append(event, ticket)
    return ticket


def delete(tx: Transaction, command: DeleteCommand) -> bool:
    current = tx.load(command.ticket_id)
    if current is None:
        return False
    event = decide_delete(current, command)
    tx.append(event, fold(current, event))
    return True


def lease(tx: Transaction, command: LeaseCommand) -> LeaseResult:
    """Lease due tickets; fail those already delivered `max_attempts` times.

    An exhausted ticket does not use up a slot of `limit`: the poll queries
    more candidates until it has leased `limit` tickets or none are left.
    """
    leased: list[Ticket] = []
    exhausted: list[Ticket] = []
    while len(leased) < command.limit:
        requested = command.limit - len(leased)
        candidates = tx.due(command.now, requested)
        changes: list[tuple[Event, Ticket]] = []
        for current in candidates:
            if command.max_attempts is not None and current.attempts >= command.max_attempts:
                event = _fail_exhausted(current, command)
                ticket = fold(current, event)
                assert ticket is not None
                exhausted.append(ticket)
            else:
                event = decide_lease(current, command)
                ticket = fold(current, event)
                assert ticket is not None
                leased.append(ticket)
            changes.append((event, ticket))
        # Written before the next query, which must not find these tickets again.
        _append_all(tx, changes)
        # Leased tickets are no longer due (process_time is positive) and
        # exhausted ones are failed, so a repeated query only finds new ones.
        if len(candidates) < requested:
            break

    # A full poll is followed by another at once, so its next_due_at would go unused.
    next_due_at = tx.next_due_at() if len(leased) < command.limit else None
    return LeaseResult(tickets=leased, next_due_at=next_due_at, exhausted=exhausted)


def _append_all(tx: Transaction, changes: list[tuple[Event, Ticket]]) -> None:
    """Append the changes through `append_many` where the store has it (`BatchTransaction`)."""
    if not changes:
        return
    append_many = getattr(tx, "append_many", None)
    if append_many is None:
        for event, ticket in changes:
            tx.append(event, ticket)
    else:
        append_many(changes)


def _fail_exhausted(current: Ticket, command: LeaseCommand) -> Event:
    reason = f"gave up after {current.attempts} deliveries: max_attempts is {command.max_attempts}"
    settle_command = SettleCommand(
        operation=SettleOperation.FAIL,
        ticket_id=current.id,
        now=command.now,
        actor=command.actor,
        error_reason=reason,
    )
    return decide_settle(current, settle_command)


def expire(tx: Transaction, command: ExpireCommand) -> int:
    removed = 0
    for current in tx.expired(command.now, command.limit):
        event = decide_expire(current, command.now, command.actor)
        tx.append(event, fold(current, event))
        removed += 1
    return removed
