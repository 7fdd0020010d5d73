"""Request and response bodies of the HTTP API that are not core models."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from kharon._ticket import MAX_DELAY, MAX_ID_LENGTH, NICE_MAX, NICE_MIN, Ticket, check_identifier
from kharon.stores._protocol import Stats

__all__ = ["ErrorBody", "Health", "Identifier", "NewTicket", "StatsBody", "TicketPage"]

# Seconds, finite, between 0 and the longest delay a ticket accepts.
DelaySeconds = Annotated[float, Field(ge=0, le=MAX_DELAY.total_seconds(), allow_inf_nan=False)]


def _check_characters(value: str) -> str:
    """Reject the characters `check_identifier` rejects, with a message that does not repeat the value.

    The error formatter adds the value as JSON. Control characters (Unicode
    category Cc) and lone surrogates (Cs) are the ones `check_identifier` rejects.
    """
    for position, character in enumerate(value):
        if unicodedata.category(character) in ("Cc", "Cs"):
            raise PydanticCustomError(
                "control_character",
                "must not contain control characters, but has U+{code} at position {position}",
                {"code": f"{ord(character):04X}", "position": position},
            )
    # The core check stays the authority, in case its rules grow.
    check_identifier(value, "the value")
    return value


# A ticket id or type in a request: what `check_identifier` accepts. The length
# limits are constraints, so they also appear in the OpenAPI schema.
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH), AfterValidator(_check_characters)]


class NewTicket(BaseModel):
    """One ticket of a `POST /tickets` body.

    `runat` and `delay` both set when the ticket is due, so at most one of
    them may be given. With neither, the ticket is due at once.
    """

    model_config = ConfigDict(extra="forbid")

    id: Identifier | None = Field(default=None, description="Ticket id; a new UUIDv7 when omitted.")
    type: Identifier
    payload: Any = None
    nice: Annotated[StrictInt, Field(ge=NICE_MIN, le=NICE_MAX)] = 0
    runat: AwareDatetime | None = Field(default=None, description="When the ticket is due, with a UTC offset.")
    delay: DelaySeconds | None = Field(default=None, description="Seconds from now until the ticket is due.")

    @model_validator(mode="after")
    def _check_one_due_time(self) -> Self:
        if self.runat is not None and self.delay is not None:
            # The error's input is the whole object, so the message need not repeat both values.
            raise PydanticCustomError("runat_and_delay", "give runat or delay, not both")
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
