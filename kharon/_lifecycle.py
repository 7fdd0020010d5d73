"""The ticket lifecycle: one transition table, the decisions, and the fold.

Rules of this module:

* `TRANSITIONS` is the only place that defines which operation may move a ticket
  from which state to which. It is declared for the `transitions` package, and
  every decision below fires that state machine to get the destination; stores and
  workers never assign a status themselves.
* Nothing here does I/O or reads a clock. Every instant comes in as an argument.
* A decision either returns the one event to append or raises, before anything
  is written: `TicketNotFound`, `VersionConflict`, `LeaseLost` or
  `InvalidTransition`.
* `fold` applies an event to a ticket. The projection a store keeps is, by
  construction, the fold of the ticket's events.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Final

from transitions import Machine, MachineError
from transitions.core import EventData

from kharon._commands import (
    UNSET,
    DeleteCommand,
    LeaseCommand,
    PutCommand,
    SettleCommand,
    SettleOperation,
)
from kharon._errors import InvalidTransition, LeaseLost, TicketNotFound, VersionConflict
from kharon._events import Event, EventKind
from kharon._ticket import BackoffDelay, FixedDelay, Ticket, TicketStatus, construct_unchecked

__all__ = [
    "ABSENT",
    "STATES",
    "TRANSITIONS",
    "allowed_operations",
    "decide_delete",
    "decide_expire",
    "decide_lease",
    "decide_put",
    "decide_settle",
    "destination",
    "fold",
]

# The pseudo-state of a ticket id with no projection row: never put, or removed.
ABSENT: Final = "absent"

PENDING: Final = TicketStatus.PENDING.value
RUNNING: Final = TicketStatus.RUNNING.value
DONE: Final = TicketStatus.DONE.value
FAILED: Final = TicketStatus.FAILED.value
CANCELLED: Final = TicketStatus.CANCELLED.value

STATES: Final = [ABSENT, PENDING, RUNNING, DONE, FAILED, CANCELLED]

# Conditions, evaluated on the event data of the trigger call:
#   is_due       the ticket's runat (for a running ticket: its lease expiry) has passed
#   keep         the caller asked to keep the ticket (ack and cancel)
#   has_expired  the TTL of a done, failed or cancelled ticket has passed
TRANSITIONS: Final[list[dict[str, Any]]] = [
    # A put starts a new lifecycle (attempts 0). A running ticket cannot be put
    # over, because its worker still holds a lease on it.
    {"trigger": "put", "source": [ABSENT, PENDING, DONE, FAILED, CANCELLED], "dest": PENDING},
    {"trigger": "lease", "source": PENDING, "dest": RUNNING, "conditions": "is_due"},
    # Re-lease after the previous lease expired without a settle call.
    {"trigger": "lease", "source": RUNNING, "dest": RUNNING, "conditions": "is_due"},
    {"trigger": "retry", "source": [PENDING, RUNNING], "dest": PENDING},
    {"trigger": "done", "source": [PENDING, RUNNING], "dest": DONE},
    {"trigger": "fail", "source": [PENDING, RUNNING], "dest": FAILED},
    {"trigger": "ack", "source": [PENDING, RUNNING], "dest": DONE, "conditions": "keep"},
    {"trigger": "ack", "source": [PENDING, RUNNING], "dest": ABSENT, "unless": "keep"},
    {"trigger": "cancel", "source": [PENDING, RUNNING], "dest": CANCELLED, "conditions": "keep"},
    {"trigger": "cancel", "source": [PENDING, RUNNING], "dest": ABSENT, "unless": "keep"},
    {"trigger": "expire", "source": [DONE, FAILED, CANCELLED], "dest": ABSENT, "conditions": "has_expired"},
    {"trigger": "delete", "source": [PENDING, RUNNING, DONE, FAILED, CANCELLED], "dest": ABSENT},
]

# Reasons a guarded transition did not fire, for the InvalidTransition message.
_CONDITION_FAILURES: Final = {
    "lease": "it is not due yet (runat, or the running lease's expiry, is in the future)",
    "expire": "its TTL has not passed",
}

_TIME_FIELDS: Final = frozenset({"runat", "created_at", "updated_at", "expires_at"})


class _Cursor:
    """The model object the state machine moves; it carries only the state."""

    state: str

    def is_due(self, event: EventData) -> bool:
        return bool(event.kwargs.get("due", False))

    def keep(self, event: EventData) -> bool:
        return bool(event.kwargs.get("keep", False))

    def has_expired(self, event: EventData) -> bool:
        return bool(event.kwargs.get("expired", False))


# NOTE: `transitions` logs every state change at INFO on "transitions.core".
# Kharon fires a transition for every event, so unless the application set a
# level for that logger, it is raised to WARNING to keep worker logs readable.
_transitions_logger = logging.getLogger("transitions.core")
if _transitions_logger.level == logging.NOTSET:
    _transitions_logger.setLevel(logging.WARNING)


def _build_machine() -> tuple[Machine, _Cursor]:
    cursor = _Cursor()
    machine = Machine(
        model=cursor,
        states=STATES,
        transitions=TRANSITIONS,
        initial=ABSENT,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=False,
    )
    return machine, cursor


# `transitions` keeps the state on the model object, so each thread gets its own
# machine and cursor: the SQLite and PostgreSQL stores decide in worker threads.
_local = threading.local()


def _machine() -> tuple[Machine, _Cursor]:
    pair: tuple[Machine, _Cursor] | None = getattr(_local, "pair", None)
    if pair is None:
        pair = _build_machine()
        _local.pair = pair
    return pair


def _allowed_from(state: str) -> tuple[str, ...]:
    names = {row["trigger"] for row in TRANSITIONS if state in _sources(row)}
    return tuple(sorted(names))


def _sources(row: dict[str, Any]) -> list[str]:
    source = row["source"]
    return [source] if isinstance(source, str) else list(source)


_ALLOWED: Final = {state: _allowed_from(state) for state in STATES}


def allowed_operations(state: str) -> tuple[str, ...]:
    """Return the operations the table allows from `state`."""
    return _ALLOWED[state]


def destination(
    ticket_id: str,
    state: str,
    operation: str,
    *,
    due: bool = False,
    keep: bool = False,
    expired: bool = False,
) -> str:
    """Fire `operation` on the state machine from `state`; return the new state.

    Raise `InvalidTransition` when the table has no row for the pair, or when
    the row's condition does not hold.
    """
    outcome = _fire(state, operation, due, keep, expired)
    if outcome is _NO_ROW:
        raise InvalidTransition(ticket_id, state, operation, allowed_operations(state))
    if outcome is _CONDITION_FAILED:
        raise InvalidTransition(
            ticket_id,
            state,
            operation,
            allowed_operations(state),
            reason=_CONDITION_FAILURES.get(operation),
        )
    return outcome


_NO_ROW: Final = "<no transition>"
_CONDITION_FAILED: Final = "<condition failed>"


# The machine's result depends only on these five values, so it is memoized:
# a decision costs a dict lookup instead of a full `transitions` trigger
# (about 30 us), and the table stays the only thing that decides. The cache
# has at most 6 states x 9 operations x 8 flag combinations entries.
@functools.cache
def _fire(state: str, operation: str, due: bool, keep: bool, expired: bool) -> str:
    machine, cursor = _machine()
    machine.set_state(state, model=cursor)
    try:
        fired = cursor.trigger(operation, due=due, keep=keep, expired=expired)  # type: ignore[attr-defined]
    except MachineError:
        return _NO_ROW
    if not fired:
        return _CONDITION_FAILED
    return cursor.state


def _state_of(ticket: Ticket | None) -> str:
    return ABSENT if ticket is None else ticket.status.value


def _status(state: str) -> TicketStatus | None:
    return None if state == ABSENT else TicketStatus(state)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _event(
    ticket_id: str,
    version: int,
    kind: EventKind,
    now: datetime,
    actor: str | None,
    before: str,
    after: str,
    changes: dict[str, Any],
) -> Event:
    # Built without validation: every value here comes from validated input.
    return construct_unchecked(
        Event,
        {
            "seq": None,
            "ticket_id": ticket_id,
            "version": version,
            "kind": kind,
            "at": now,
            "actor": actor,
            "status_before": _status(before),
            "status_after": _status(after),
            "changes": changes,
            "schema_version": 1,
        },
    )


def decide_put(current: Ticket | None, command: PutCommand, last_version: int) -> Event:
    """Decide a put. `last_version` is the newest version in the log for this id."""
    ticket = command.ticket
    before = _state_of(current)
    after = destination(ticket.id, before, "put")
    now = command.now
    changes = {
        "type": ticket.type,
        "payload": ticket.payload,
        "nice": ticket.nice,
        "runat": _iso(ticket.runat or now),
        "attempts": 0,
        "error_reason": None,
        "created_at": _iso(now),
        "expires_at": None,
        "lease_version": None,
    }
    return _event(ticket.id, last_version + 1, EventKind.PUT, now, command.actor, before, after, changes)


def decide_lease(current: Ticket, command: LeaseCommand) -> Event:
    """Decide the lease of a due ticket by a poll.

    The lease lasts `process_time` plus the poll backoff on the attempts made
    so far, and the ticket's runat becomes that expiry. Leasing a running
    ticket again records, as its error reason, that the previous lease expired
    with no settle call: the handler's own timeout retry usually loses the race
    to this lease, so this event records why the attempt ended.
    """
    now = command.now
    before = _state_of(current)
    due = current.runat is not None and current.runat <= now
    after = destination(current.id, before, "lease", due=due)
    expiry = now + command.process_time + command.backoff.compute(current.attempts)
    changes: dict[str, Any] = {"attempts": current.attempts + 1, "runat": _iso(expiry)}
    if before == RUNNING:
        changes["error_reason"] = (
            f"lease of attempt {current.attempts} expired at {_iso(current.runat)} with no settle call"
        )
    return _event(current.id, current.version + 1, EventKind.LEASE, now, command.actor, before, after, changes)


def _check_preconditions(current: Ticket | None, ticket_id: str, operation: str, command: SettleCommand) -> Ticket:
    if current is None:
        raise TicketNotFound(ticket_id, operation)
    if command.expected_version is not None and command.expected_version != current.version:
        raise VersionConflict(ticket_id, command.expected_version, current.version)
    if command.lease is not None and command.lease != current.attempts:
        raise LeaseLost(ticket_id, command.lease, current.attempts, operation)
    if command.lease_version is not None and command.lease_version != current.lease_version:
        stale = current.attempts if command.lease is None else command.lease
        detail = (
            f"it was granted by event version {command.lease_version}, "
            f"the current lease by version {current.lease_version}"
        )
        raise LeaseLost(ticket_id, stale, current.attempts, operation, detail)
    return current


def _delay_after(delay: FixedDelay | BackoffDelay | None, attempts: int, jitter_sample: float) -> timedelta | None:
    return None if delay is None else delay.compute(attempts, jitter_sample)


def decide_settle(current: Ticket | None, command: SettleCommand) -> Event:
    """Decide ack, done, fail, cancel or retry.

    Retry: runat becomes now + delay. Done, fail and a kept ack or cancel: the
    delay, if given, is the TTL after which the ticket expires. An ack or
    cancel without keep removes the ticket; its options still go into the event,
    so the reason for a cancel is on record.
    """
    operation = command.operation.value
    ticket = _check_preconditions(current, command.ticket_id, operation, command)
    before = _state_of(ticket)
    after = destination(ticket.id, before, operation, keep=command.keep)
    now = command.now
    delay = _delay_after(command.delay, ticket.attempts, command.jitter_sample)

    changes: dict[str, Any] = {}
    if command.operation is SettleOperation.RETRY:
        changes["runat"] = _iso(now + (delay or timedelta(0)))
    elif after != ABSENT:
        changes["expires_at"] = _iso(None if delay is None else now + delay)
    if command.nice is not None:
        changes["nice"] = command.nice
    if command.error_reason is not UNSET:
        changes["error_reason"] = command.error_reason
    if command.payload is not UNSET:
        changes["payload"] = command.payload
    if command.runat is not None:
        changes["runat"] = _iso(command.runat)
    return _event(ticket.id, ticket.version + 1, EventKind(operation), now, command.actor, before, after, changes)


def decide_expire(current: Ticket, now: datetime, actor: str | None) -> Event:
    before = _state_of(current)
    expired = current.expires_at is not None and current.expires_at <= now
    after = destination(current.id, before, "expire", expired=expired)
    return _event(current.id, current.version + 1, EventKind.EXPIRE, now, actor, before, after, {})


def decide_delete(current: Ticket, command: DeleteCommand) -> Event:
    before = _state_of(current)
    after = destination(current.id, before, "delete")
    return _event(current.id, current.version + 1, EventKind.DELETE, command.now, command.actor, before, after, {})


def fold(current: Ticket | None, event: Event) -> Ticket | None:
    """Apply one event to a ticket's state; None is the absent ticket.

    Raise `ValueError` when the event cannot follow `current` (a corrupt or
    reordered log).
    """
    if event.status_after is None:
        return None
    fields: dict[str, Any] = {}
    for key, value in event.changes.items():
        fields[key] = datetime.fromisoformat(value) if key in _TIME_FIELDS and value is not None else value
    fields["status"] = event.status_after
    fields["version"] = event.version
    fields["updated_at"] = event.at
    if event.kind is EventKind.LEASE:
        fields["lease_version"] = event.version

    if event.kind is EventKind.PUT:
        return construct_unchecked(Ticket, {"id": event.ticket_id, **fields})
    if current is None:
        raise ValueError(
            f"event {event.kind.value!r} version {event.version} of ticket {event.ticket_id!r} "
            "follows no put: the log is incomplete"
        )
    if current.version >= event.version:
        raise ValueError(
            f"event version {event.version} of ticket {event.ticket_id!r} does not follow version {current.version}"
        )
    # The same fields as `current.model_copy(update=fields)`, built in a quarter of the time.
    return construct_unchecked(Ticket, {**current.__dict__, **fields})


def replay(events: Iterable[Event], *, until: datetime | None = None) -> Ticket | None:
    """Fold a ticket's events, in version order, into its state.

    With `until`, only events at or before that instant are applied, which
    gives the ticket as it was then (None if it did not exist).
    """
    ticket: Ticket | None = None
    for event in events:
        if until is not None and event.at > until:
            break
        ticket = fold(ticket, event)
    return ticket
