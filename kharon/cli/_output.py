"""Rendering of tickets, events and stats for the terminal (rich) or as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from pydantic import TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kharon._events import Event
from kharon._ticket import Ticket
from kharon.stores._protocol import Stats

__all__ = ["print_events", "print_json", "print_stats", "print_ticket"]

_events_adapter: TypeAdapter[list[Event]] = TypeAdapter(list[Event])


# Width of tables written to a pipe or file, where rich would assume 80
# columns and fold the changes column into a narrow strip.
_PIPE_WIDTH = 160


def _console() -> Console:
    # Created per call, so it writes to the current sys.stdout (CliRunner swaps it).
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = _PIPE_WIDTH
    return console


def _instant(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def print_json(value: Any) -> None:
    """Print JSON data, or a pydantic model or list of events, as indented JSON."""
    if isinstance(value, Ticket):
        text = value.model_dump_json(indent=2)
    elif isinstance(value, list) and all(isinstance(item, Event) for item in value):
        text = _events_adapter.dump_json(value, indent=2).decode()
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False)
    click.echo(text)


def print_ticket(ticket: Ticket) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("id", ticket.id),
        ("type", ticket.type),
        ("status", ticket.status.value),
        ("payload", _compact_json(ticket.payload)),
        ("nice", str(ticket.nice)),
        ("runat", _instant(ticket.runat)),
        ("attempts", str(ticket.attempts)),
        ("error reason", _compact_json(ticket.error_reason)),
        ("created at", _instant(ticket.created_at)),
        ("updated at", _instant(ticket.updated_at)),
        ("expires at", _instant(ticket.expires_at)),
        ("version", str(ticket.version)),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    _console().print(table)


def print_events(ticket_id: str, events: Sequence[Event]) -> None:
    table = Table(title=escape(f"history of ticket {ticket_id}"), title_justify="left")
    table.add_column("seq", justify="right", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("status")
    table.add_column("at", no_wrap=True)
    table.add_column("actor", overflow="fold")
    table.add_column("changes", overflow="fold")
    for event in events:
        before = event.status_before.value if event.status_before is not None else "(none)"
        after = event.status_after.value if event.status_after is not None else "(removed)"
        table.add_row(
            str(event.seq),
            str(event.version),
            event.kind.value,
            f"{before} → {after}",
            _instant(event.at),
            escape(event.actor or "-"),
            escape(_changes_lines(event.changes)),
        )
    _console().print(table)


def _changes_lines(changes: dict[str, Any]) -> str:
    """Return one "field: value" line per changed field, values as compact JSON."""
    return "\n".join(f"{name}: {_compact_json(value)}" for name, value in changes.items()) or "-"


def stats_to_json(stats: Stats) -> dict[str, Any]:
    return {
        "total": stats.total,
        "by_status": stats.by_status,
        "by_type": stats.by_type,
        "events_by_kind": stats.events_by_kind,
        "last_seq": stats.last_seq,
    }


def print_stats(stats: Stats) -> None:
    console = _console()
    statuses = list(stats.by_status)

    by_status = Table(title="tickets by status", title_justify="left")
    for status in statuses:
        by_status.add_column(status, justify="right")
    by_status.add_column("total", justify="right")
    by_status.add_row(*(str(stats.by_status[status]) for status in statuses), str(stats.total))
    console.print(by_status)

    if stats.by_type:
        by_type = Table(title="tickets by type", title_justify="left")
        by_type.add_column("type")
        for status in statuses:
            by_type.add_column(status, justify="right")
        for ticket_type in sorted(stats.by_type):
            counts = stats.by_type[ticket_type]
            by_type.add_row(escape(ticket_type), *(str(counts.get(status, 0)) for status in statuses))
        console.print(by_type)

    event_count = sum(stats.events_by_kind.values())
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(stats.events_by_kind.items()))
    by_kind = f" ({kinds})" if kinds else ""
    console.print(f"events in the log: {event_count}{by_kind}, last seq {stats.last_seq}")
