"""Request and response bodies of the HTTP API that are not core models."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from kharon._ticket import MAX_DELAY, NICE_MAX, NICE_MIN, Ticket, check_identifier
from kharon.stores._protocol import Stats

__all__ = ["ErrorBody", "Health", "NewTicket", "StatsBody", "TicketPage"]

# Seconds, finite, between 0 and the longest delay a ticket accepts.
DelaySeconds = Annotated[float, Field(ge=0, le=MAX_DELAY.total_seconds(), allow_inf_nan=False)]


class NewTicket(BaseModel):
    """One ticket of a `POST /tickets` body.

    `runat` and `delay` both set when the ticket is due, so at most one of
    them may be given. With neither, the ticket is due at once.
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, description="Ticket id; a new UUIDv7 when omitted.")
    type: str
    payload: Any = None
    nice: Annotated[StrictInt, Field(ge=NICE_MIN, le=NICE_MAX)] = 0
    runat: datetime | None = Field(default=None, description="When the ticket is due, with a UTC offset.")
    delay: DelaySeconds | None = Field(default=None, description="Seconds from now until the ticket is due.")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        return None if value is None else check_identifier(value, "ticket id")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        return check_identifier(value, "ticket type")

    @model_validator(mode="after")
    def _check_one_due_time(self) -> Self:
        if self.runat is not None and self.delay is not None:
            raise ValueError(
                f"give runat or delay, not both (got runat {self.runat.isoformat()} and delay {self.delay} s)"
            )
        return self


class TicketPage(BaseModel):
    """One page of `GET /tickets`, ordered by id."""

    items: list[Ticket]
    # Pass as `after` to read the next page; None on the last page.
    next: str | None


class StatsBody(BaseModel):
    """Counts over the projection and the event log."""

    total: int
    by_status: dict[str, int]
    by_type: dict[str, dict[str, int]]
    events_by_kind: dict[str, int]
    last_seq: int

    @classmethod
    def from_stats(cls, stats: Stats) -> StatsBody:
        return cls(
            total=stats.total,
            by_status=stats.by_status,
            by_type=stats.by_type,
            events_by_kind=stats.events_by_kind,
            last_seq=stats.last_seq,
        )


class Health(BaseModel):
    status: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    detail: Any = None
