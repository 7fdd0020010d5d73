"""Clocks, UTC helpers and UUIDv7 ids.

Kharon reads wall-clock time in exactly one place, the `Clock` given to
`Kharon`. The pure core (`_lifecycle`) never reads a clock: every operation
carries the instant it happened at.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import trio

__all__ = [
    "Clock",
    "SystemClock",
    "TrioClock",
    "from_micros",
    "new_ticket_id",
    "to_micros",
    "utc",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@runtime_checkable
class Clock(Protocol):
    """A source of the current wall-clock time, timezone-aware and in UTC."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class TrioClock:
    """A wall clock that advances with Trio's clock.

    Under `trio.testing.MockClock` the wall clock then jumps exactly as far as
    the mock clock does, so lease expiries, backoff delays and TTLs can be
    tested with no real sleep. `start` is the wall time at the moment the clock
    is first read inside a Trio run.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._start = utc(start) if start is not None else datetime.now(UTC)
        self._trio_origin: float | None = None

    def now(self) -> datetime:
        current = trio.current_time()
        if self._trio_origin is None:
            self._trio_origin = current
        return self._start + timedelta(seconds=current - self._trio_origin)


def utc(value: datetime) -> datetime:
    """Return `value` converted to UTC; raise `ValueError` for a naive datetime."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(
            f"naive datetime {value.isoformat()!r} is ambiguous; "
            "pass a timezone-aware datetime, for example datetime.now(UTC)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"datetime {value.isoformat()!r} is out of range once converted to UTC") from None


def to_micros(value: datetime) -> int:
    """Return microseconds since the Unix epoch, the integer form stored in SQL."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


_uuid7_lock = threading.Lock()
_uuid7_last_ms = 0
_uuid7_counter = 0


def new_ticket_id() -> str:
    """Return a new UUIDv7 (RFC 9562) string.

    The first 48 bits are the Unix time in milliseconds, so ids sort by creation
    time. Within one millisecond a 12-bit counter in `rand_a` keeps ids from one
    process strictly increasing; the remaining 62 bits are random.
    """
    global _uuid7_last_ms, _uuid7_counter
    with _uuid7_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _uuid7_last_ms:
            _uuid7_last_ms = now_ms
            _uuid7_counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        else:
            # Same (or an earlier, after a clock step back) millisecond: count up
            # from the last value. On counter overflow, borrow the next millisecond.
            _uuid7_counter += 1
            if _uuid7_counter > 0xFFF:
                _uuid7_last_ms += 1
                _uuid7_counter = 0
        unix_ms = _uuid7_last_ms
        counter = _uuid7_counter
    random_bits = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= random_bits
    return str(uuid.UUID(int=value))
