"""The ticket model and the delay strategies."""

from __future__ import annotations

import enum
import json
import math
import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
)

from kharon._time import new_ticket_id, utc

__all__ = [
    "MAX_DELAY",
    "MAX_ID_LENGTH",
    "MAX_JSON_DEPTH",
    "NICE_MAX",
    "NICE_MIN",
    "BackoffDelay",
    "Delay",
    "FixedDelay",
    "Ticket",
    "TicketStatus",
    "as_delay",
    "check_identifier",
    "construct_unchecked",
    "copy_json",
    "copy_ticket",
    "normalize_json",
]

MAX_ID_LENGTH = 255
# nice must fit a signed 32-bit integer, the INTEGER column of PostgreSQL.
NICE_MIN = -(2**31)
NICE_MAX = 2**31 - 1
# The maximum delay or TTL accepted. Much longer values would overflow
# `datetime` (year 9999) when added to the current time; nothing needs more.
MAX_DELAY = timedelta(days=365 * 100)


class TicketStatus(enum.StrEnum):
    """The state of a ticket in its lifecycle."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Unicode category Cc (C0 and C1 control characters) and lone surrogates, which
# cannot be encoded as UTF-8 and so cannot be stored.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def check_identifier(value: object, what: str) -> str:
    """Validate a ticket id or type: a non-empty string of printable characters."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} is {len(value)} characters long, the limit is {MAX_ID_LENGTH}: {value[:40]!r}...")
    control = _CONTROL_CHARACTER.search(value)
    if control is not None:
        raise ValueError(
            f"{what} {value!r} contains the control character {control.group()!r} at position {control.start()}"
        )
    return value


# Deepest nesting of dicts and lists accepted in a payload or error reason.
# pydantic serializes at most 255 levels and an API response wraps the payload
# in a few more, so a deeper value could be stored but never returned.
MAX_JSON_DEPTH = 100


def normalize_json(value: Any, what: str) -> Any:
    """Return `value` as plain JSON data, or raise `ValueError` naming the problem.

    A pydantic model is dumped in JSON mode. Anything else must already be JSON:
    dict with string keys, list, str, int, float, bool or None, nested at most
    `MAX_JSON_DEPTH` levels. NaN and the infinities are rejected because JSON
    has no spelling for them, and lone surrogates because UTF-8 cannot encode
    them. The value is round-tripped through `json`, so tuples come back as
    lists, exactly as a store would return them.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    _check_depth(value, what)
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:
        if "Out of range float values" in str(exc):
            raise ValueError(f"{what} contains NaN or an infinite number, which JSON cannot represent") from exc
        raise ValueError(f"{what} is not JSON-serializable: {exc}") from exc
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc}); pass JSON data or a pydantic model") from exc
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} contains the lone surrogate {text[exc.start : exc.end]!r}, which UTF-8 cannot encode"
        ) from None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return json.loads(text)


def _check_depth(value: Any, what: str) -> None:
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep, the limit")
        pending.extend((child, depth + 1) for child in children)


ModelT = TypeVar("ModelT", bound=BaseModel)


def construct_unchecked(model: type[ModelT], fields: dict[str, Any]) -> ModelT:
    """Build a `model` instance from trusted values without validation; it takes ownership of `fields`.

    The result equals `model.model_construct(**fields)`. When `fields` names
    exactly the model's fields, the instance is assembled directly, which
    takes about a quarter of the time of `model_construct` (pydantic 2.14)
    because no field is looked up for an alias or a default. That path sets
    the attributes `model_construct` sets for a model with no extras, private
    attributes or `model_post_init`, which holds for `Ticket` and `Event`.
    Any other set of keys goes through `model_construct`. The fields are put
    in declaration order, because pydantic dumps and prints `__dict__` in its
    order, and a folded ticket must serialize exactly as a validated one.
    """
    declared = model.__pydantic_fields__
    if fields.keys() != declared.keys():
        return model.model_construct(**fields)
    if tuple(fields) != tuple(declared):
        fields = {name: fields[name] for name in declared}
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", fields)
    object.__setattr__(instance, "__pydantic_fields_set__", set(fields))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def copy_json(value: Any) -> Any:
    """Return a deep copy of JSON data; several times faster than `copy.deepcopy`."""
    if isinstance(value, dict):
        return {key: copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_json(item) for item in value]
    return value


def copy_ticket(ticket: Ticket) -> Ticket:
    """Return a copy of `ticket` that shares no mutable data with it."""
    return ticket.model_copy(
        update={"payload": copy_json(ticket.payload), "error_reason": copy_json(ticket.error_reason)}
    )


def _check_duration(value: timedelta, what: str) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"{what} must not be negative, got {value.total_seconds()} s")
    if value > MAX_DELAY:
        raise ValueError(f"{what} of {value} is longer than the maximum of {MAX_DELAY}")
    return value


def _as_timedelta(value: object, what: str) -> object:
    """Accept int/float seconds as well as `timedelta`, rejecting NaN and infinities."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a timedelta or a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
        if abs(value) > MAX_DELAY.total_seconds():
            raise ValueError(f"{what} of {value} s is longer than the maximum of {MAX_DELAY}")
        return timedelta(seconds=value)
    return value


class FixedDelay(BaseModel):
    """A constant delay."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delay: timedelta

    def __init__(self, delay: timedelta | float, /, **data: Any) -> None:
        super().__init__(delay=delay, **data)

    @field_validator("delay", mode="before")
    @classmethod
    def _coerce(cls, value: object) -> object:
        return _as_timedelta(value, "delay")

    @field_validator("delay")
    @classmethod
    def _check(cls, value: timedelta) -> timedelta:
        return _check_duration(value, "delay")

    def compute(self, attempts: int, jitter_sample: float = 0.0) -> timedelta:
        return self.delay


class BackoffDelay(BaseModel):
    """Exponential backoff: `min(base ** attempts, max_delay)` seconds plus jitter.

    The jitter is uniformly random in `[0, jitter]`. The power is computed in
    floating point and capped before it becomes a `timedelta`, so any number of
    attempts is safe.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 1.5
    max_delay: timedelta = timedelta(seconds=15)
    jitter: timedelta = timedelta(0)

    def __init__(
        self,
        base: float = 1.5,
        max_delay: timedelta | float = timedelta(seconds=15),
        jitter: timedelta | float = timedelta(0),
        /,
        **data: Any,
    ) -> None:
        super().__init__(base=base, max_delay=max_delay, jitter=jitter, **data)

    @field_validator("max_delay", "jitter", mode="before")
    @classmethod
    def _coerce(cls, value: object) -> object:
        return _as_timedelta(value, "backoff delay")

    @field_validator("max_delay", "jitter")
    @classmethod
    def _check(cls, value: timedelta) -> timedelta:
        return _check_duration(value, "backoff delay")

    def compute(self, attempts: int, jitter_sample: float = 0.0) -> timedelta:
        """Return the delay after `attempts` deliveries; `jitter_sample` is in `[0, 1]`."""
        if attempts < 0:
            raise ValueError(f"attempts must not be negative, got {attempts}")
        cap = self.max_delay.total_seconds()
        try:
            seconds = min(self.base**attempts, cap)
        except OverflowError:
            seconds = cap
        return timedelta(seconds=seconds) + self.jitter * jitter_sample


Delay = FixedDelay | BackoffDelay | timedelta


def as_delay(value: Delay | None) -> FixedDelay | BackoffDelay | None:
    """Turn a `timedelta` into a `FixedDelay`; validate anything else."""
    if value is None or isinstance(value, (FixedDelay, BackoffDelay)):
        return value
    if isinstance(value, timedelta):
        return FixedDelay(value)
    raise TypeError(f"delay must be a FixedDelay, a BackoffDelay or a timedelta, got {type(value).__name__} {value!r}")


Nice = Annotated[StrictInt, Field(ge=NICE_MIN, le=NICE_MAX)]


class Ticket(BaseModel):
    """A unit of work: a typed JSON payload to be handled at or after `runat`.

    Fields a caller sets: `id` (a new UUIDv7 when omitted), `type`, `payload`,
    `nice` (lower runs first) and `runat` (None: as soon as it is put). The
    other fields are maintained by Kharon and ignored by `put`.
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    id: str = Field(default_factory=new_ticket_id)
    type: str
    payload: Any = None
    nice: Nice = 0
    runat: datetime | None = None
    status: TicketStatus = TicketStatus.PENDING
    attempts: Annotated[StrictInt, Field(ge=0)] = 0
    error_reason: Any = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # When a done, failed or cancelled ticket is removed; None keeps it forever.
    expires_at: datetime | None = None
    # Number of events applied to this ticket id, over all its lifecycles.
    version: Annotated[StrictInt, Field(ge=0)] = 0
    # Version of the lease event that started the current (or last) delivery.
    # Settle calls from a handler must carry it, which fences stale workers.
    lease_version: int | None = None

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return check_identifier(value, "ticket id")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        return check_identifier(value, "ticket type")

    @field_validator("payload")
    @classmethod
    def _check_payload(cls, value: Any) -> Any:
        return normalize_json(value, "payload")

    @field_validator("error_reason")
    @classmethod
    def _check_error_reason(cls, value: Any) -> Any:
        return normalize_error_reason(value)

    @field_validator("runat", "created_at", "updated_at", "expires_at")
    @classmethod
    def _check_instant(cls, value: datetime | None) -> datetime | None:
        return None if value is None else utc(value)

    def with_payload(self, payload: Any) -> Self:
        """Return a copy with `payload` replaced (JSON data or a pydantic model)."""
        return self._copy_with("payload", payload)

    def with_nice(self, nice: int) -> Self:
        """Return a copy with `nice` replaced."""
        return self._copy_with("nice", nice)

    def with_runat(self, runat: datetime) -> Self:
        """Return a copy due at `runat` (timezone-aware)."""
        return self._copy_with("runat", runat)

    def _copy_with(self, field: str, value: Any) -> Self:
        copy = self.model_copy(
            update={"payload": copy_json(self.payload), "error_reason": copy_json(self.error_reason)}
        )
        setattr(copy, field, value)
        return copy


def normalize_error_reason(value: Any) -> Any:
    """Store an exception as "Type: message"; anything else must be JSON data."""
    if isinstance(value, BaseException):
        # Exception messages may carry lone surrogates (from surrogateescape
        # decoding of file names, say), which a store cannot encode.
        message = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
        return f"{type(value).__name__}: {message}" if message else type(value).__name__
    return normalize_json(value, "error reason")
