"""Settings of a `Kharon` instance and its workers."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kharon._ticket import MAX_DELAY, BackoffDelay

__all__ = ["Settings"]

PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class Settings(BaseModel):
    """Worker pool, lease, backoff, polling and expiration settings.

    Durations accept a `timedelta` or a number of seconds. Every value is
    validated: NaN, infinities, zero or negative intervals raise `ValueError`
    naming the setting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: PositiveInt = 4
    # Most tickets one poll leases. Capped at `workers`, so no leased ticket
    # waits for a free worker while its lease runs down.
    batch_size: PositiveInt = 10
    # The lease: how long a handler may run before its ticket is due again.
    process_time: timedelta = timedelta(seconds=30)
    # Default backoff, for retries without a delay and for the lease margin:
    # min(backoff_base ** attempts, max_backoff_delay) seconds.
    backoff_base: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 1.5
    max_backoff_delay: timedelta = timedelta(seconds=15)
    # An idle poller waits between these bounds; a write in this process wakes it at once.
    max_poll_interval: timedelta = timedelta(seconds=15)
    min_poll_interval: timedelta = timedelta(milliseconds=10)
    enable_expiration: bool = True
    expiration_interval: timedelta = timedelta(milliseconds=100)
    # Most tickets one expiration pass removes in one transaction.
    expiration_batch_size: PositiveInt = 1000
    # A ticket already delivered this many times is failed instead of leased again.
    max_attempts: PositiveInt | None = None
    # On shutdown, how long running handlers may take to finish before they are
    # cancelled and their tickets released back to pending.
    shutdown_grace_period: timedelta = timedelta(seconds=10)

    @field_validator(
        "process_time",
        "max_backoff_delay",
        "max_poll_interval",
        "min_poll_interval",
        "expiration_interval",
        "shutdown_grace_period",
        mode="before",
    )
    @classmethod
    def _coerce_seconds(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError(f"expected a timedelta or a number of seconds, got {value!r}")
        if isinstance(value, (int, float)):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"expected a finite number of seconds, got {value!r}")
            if abs(value) > MAX_DELAY.total_seconds():
                raise ValueError(f"{value} s is longer than the maximum of {MAX_DELAY}")
            return timedelta(seconds=value)
        return value

    @field_validator("process_time", "max_poll_interval", "min_poll_interval", "expiration_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"must be positive, got {value.total_seconds()} s")
        if value > MAX_DELAY:
            raise ValueError(f"{value} is longer than the maximum of {MAX_DELAY}")
        return value

    @field_validator("max_backoff_delay", "shutdown_grace_period")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"must not be negative, got {value.total_seconds()} s")
        if value > MAX_DELAY:
            raise ValueError(f"{value} is longer than the maximum of {MAX_DELAY}")
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> Self:
        if self.min_poll_interval > self.max_poll_interval:
            raise ValueError(
                f"min_poll_interval ({self.min_poll_interval.total_seconds()} s) is longer than "
                f"max_poll_interval ({self.max_poll_interval.total_seconds()} s)"
            )
        return self

    @property
    def effective_batch_size(self) -> int:
        """`batch_size` capped at `workers`."""
        return min(self.batch_size, self.workers)

    @property
    def backoff(self) -> BackoffDelay:
        """The default backoff strategy, without jitter."""
        return BackoffDelay(self.backoff_base, self.max_backoff_delay)
