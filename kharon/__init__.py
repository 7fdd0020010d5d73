"""Kharon: durable, delayed task processing as an event-sourced state machine.

Tickets are put into a store, leased by Trio workers, routed by type to
handlers and settled with ack, done, fail, cancel or retry. Every change is an
event in an append-only log; the table the workers poll is the fold of that
log, kept in the same transaction.
"""

from kharon._errors import (
    InvalidTransition,
    KharonError,
    LeaseLost,
    SchemaError,
    StoreClosed,
    TicketNotFound,
    VersionConflict,
)
from kharon._events import Event, EventKind
from kharon._kharon import Delivery, Kharon, current_delivery
from kharon._lifecycle import TRANSITIONS, fold, replay
from kharon._router import Router
from kharon._settings import Settings
from kharon._ticket import BackoffDelay, FixedDelay, Ticket, TicketStatus
from kharon._time import Clock, SystemClock, TrioClock, new_ticket_id

__all__ = [
    "TRANSITIONS",
    "BackoffDelay",
    "Clock",
    "Delivery",
    "Event",
    "EventKind",
    "FixedDelay",
    "InvalidTransition",
    "Kharon",
    "KharonError",
    "LeaseLost",
    "Router",
    "SchemaError",
    "Settings",
    "StoreClosed",
    "SystemClock",
    "Ticket",
    "TicketNotFound",
    "TicketStatus",
    "TrioClock",
    "VersionConflict",
    "current_delivery",
    "fold",
    "new_ticket_id",
    "replay",
]

__version__ = "0.1.0"
