"""Commands: the requests `Kharon` sends a store, one per operation.

A command carries everything the decision needs, including the instant `now`
and any random draw, so the decision itself is a pure function of the command
and the ticket's current state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from kharon._ticket import BackoffDelay, FixedDelay, Ticket

__all__ = [
    "UNSET",
    "DeleteCommand",
    "ExpireCommand",
    "LeaseCommand",
    "LeaseResult",
    "PutCommand",
    "SettleCommand",
    "SettleOperation",
    "Unset",
]


class Unset(enum.Enum):
    """Marker for an option that was not given (None is a valid JSON value)."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET


class SettleOperation(enum.StrEnum):
    RETRY = "retry"
    DONE = "done"
    FAIL = "fail"
    ACK = "ack"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class PutCommand:
    """Put `ticket` as a new pending lifecycle. Its runat, nice and payload are final."""

    ticket: Ticket
    now: datetime
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class SettleCommand:
    """Settle (ack, done, fail, cancel or retry) one ticket."""

    operation: SettleOperation
    ticket_id: str
    now: datetime
    actor: str | None = None
    # Fencing: the attempts number, and the lease event's version, that the
    # caller's delivery had. A mismatch raises LeaseLost.
    lease: int | None = None
    lease_version: int | None = None
    # Optimistic concurrency: the ticket version the caller read (used by the
    # `update=` callables); a mismatch raises VersionConflict.
    expected_version: int | None = None
    keep: bool = False
    # Retry: when to run next. Done, fail and kept ack/cancel: the TTL.
    delay: FixedDelay | BackoffDelay | None = None
    jitter_sample: float = 0.0
    nice: int | None = None
    error_reason: Any = UNSET
    payload: Any = UNSET
    runat: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeleteCommand:
    ticket_id: str
    now: datetime
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseCommand:
    """Lease up to `limit` due tickets, in poll order."""

    limit: int
    now: datetime
    process_time: timedelta
    backoff: BackoffDelay
    actor: str | None = None
    # A ticket already delivered this many times is failed instead of leased.
    max_attempts: int | None = None


@dataclass(frozen=True, slots=True)
class LeaseResult:
    tickets: list[Ticket]
    # Earliest runat of the pending and running tickets left, None when there
    # are none. The poller sleeps until then (within its poll intervals). It is
    # computed only when the poll leased fewer than `limit` tickets, and is
    # None after a full poll, because the poller then polls again at once.
    next_due_at: datetime | None
    # Tickets failed because they reached max_attempts during this poll.
    exhausted: list[Ticket] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExpireCommand:
    """Remove up to `limit` done, failed or cancelled tickets whose TTL passed."""

    limit: int
    now: datetime
    actor: str | None = None
