"""SQL of the SQLite store: row conversion, the engine's `Transaction`, the reads.

Everything here is synchronous and runs in a worker thread on a connection
the caller owns for the duration of the call. Rows come from our own schema
and were validated when they were written, so tickets and events are rebuilt
with `construct_unchecked`, which skips validation.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import cache
from typing import Any, Final

from kharon._errors import VersionConflict
from kharon._events import Event, EventKind
from kharon._ticket import Ticket, TicketStatus, construct_unchecked
from kharon._time import from_micros, to_micros
from kharon.stores._protocol import Stats, empty_status_counts

__all__ = [
    "SQLiteTransaction",
    "count_stats",
    "select_events",
    "select_history",
    "select_ticket",
    "select_tickets",
]

_TICKET_COLUMNS: Final = (
    "id, type, payload, nice, runat, status, attempts, error_reason, "
    "created_at, updated_at, expires_at, version, lease_version"
)
_EVENT_COLUMNS: Final = "seq, ticket_id, version, kind, at, actor, status_before, status_after, changes, schema_version"

_SELECT_TICKET: Final = f"SELECT {_TICKET_COLUMNS} FROM tickets WHERE id = ?"
_SELECT_LAST_VERSION: Final = "SELECT max(version) FROM events WHERE ticket_id = ?"
# The status terms repeat the WHERE clauses of the partial indexes in
# 0001_init.sql word for word: SQLite only uses a partial index when the query
# implies its condition. INDEXED BY pins the index: without statistics the
# planner prefers tickets_status_id and sorts, and with it a schema change
# that makes the index unusable fails loudly instead of slowing the poll.
_SELECT_DUE: Final = (
    f"SELECT {_TICKET_COLUMNS} FROM tickets INDEXED BY tickets_poll "
    "WHERE status IN ('pending', 'running') AND runat <= ? "
    "ORDER BY nice, runat, put_seq LIMIT ?"
)
_SELECT_EXPIRED: Final = (
    f"SELECT {_TICKET_COLUMNS} FROM tickets INDEXED BY tickets_expiry WHERE status IN ('done', 'failed', 'cancelled') "
    "AND expires_at <= ? ORDER BY expires_at, id LIMIT ?"
)
_SELECT_NEXT_DUE: Final = (
    "SELECT min(runat) FROM tickets INDEXED BY tickets_next_due WHERE status IN ('pending', 'running')"
)
_INSERT_EVENT: Final = (
    "INSERT INTO events (ticket_id, version, kind, at, actor, status_before, status_after, changes, schema_version) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A put starts a new lifecycle, so it replaces any old row and takes a new put_seq.
_REPLACE_TICKET: Final = (
    f"INSERT OR REPLACE INTO tickets ({_TICKET_COLUMNS}, put_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLite maintains every index that contains a column named in an UPDATE's
# SET list, so a column that is in an index is SET only when its value
# changed. The other columns are always SET.
_PLAIN_COLUMNS: Final = ("payload", "attempts", "error_reason", "created_at", "updated_at", "version", "lease_version")
_INDEXED_COLUMNS: Final = ("type", "nice", "runat", "status", "expires_at")
_DELETE_TICKET: Final = "DELETE FROM tickets WHERE id = ?"

# One encoder for every write: json.dumps with keyword arguments builds a new
# encoder per call. The values were validated as JSON by the ticket model.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode_json(value: Any) -> str:
    # None is the usual payload and error reason, so it skips the encoder.
    return "null" if value is None else _encoder.encode(value)


def _decode_json(text: str) -> Any:
    return None if text == "null" else json.loads(text)


_STATUSES: Final = {status.value: status for status in TicketStatus}
_KINDS: Final = {kind.value: kind for kind in EventKind}


def _micros(value: datetime | None) -> int | None:
    return None if value is None else to_micros(value)


def _instant(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def _ticket_from_row(row: tuple[Any, ...]) -> Ticket:
    return construct_unchecked(
        Ticket,
        {
            "id": row[0],
            "type": row[1],
            "payload": _decode_json(row[2]),
            "nice": row[3],
            "runat": _instant(row[4]),
            "status": _STATUSES[row[5]],
            "attempts": row[6],
            "error_reason": _decode_json(row[7]),
            "created_at": _instant(row[8]),
            "updated_at": _instant(row[9]),
            "expires_at": _instant(row[10]),
            "version": row[11],
            "lease_version": row[12],
        },
    )


def _ticket_values(ticket: Ticket) -> tuple[Any, ...]:
    """Return the column values after `id`, in `_TICKET_COLUMNS` order."""
    return (
        ticket.type,
        _encode_json(ticket.payload),
        ticket.nice,
        _micros(ticket.runat),
        ticket.status.value,
        ticket.attempts,
        _encode_json(ticket.error_reason),
        _micros(ticket.created_at),
        _micros(ticket.updated_at),
        _micros(ticket.expires_at),
        ticket.version,
        ticket.lease_version,
    )


@cache
def _update_sql(indexed: tuple[str, ...]) -> str:
    assignments = ", ".join(f"{column} = ?" for column in (*_PLAIN_COLUMNS, *indexed))
    return f"UPDATE tickets SET {assignments} WHERE id = ?"


def _update_values(before: Ticket | None, ticket: Ticket) -> tuple[str, list[Any]]:
    """Return the UPDATE statement and its parameters that turn row `before` into `ticket`."""
    values: list[Any] = [
        _encode_json(ticket.payload),
        ticket.attempts,
        _encode_json(ticket.error_reason),
        _micros(ticket.created_at),
        _micros(ticket.updated_at),
        ticket.version,
        ticket.lease_version,
    ]
    indexed: list[str] = []
    if before is None or before.type != ticket.type:
        indexed.append("type")
        values.append(ticket.type)
    if before is None or before.nice != ticket.nice:
        indexed.append("nice")
        values.append(ticket.nice)
    if before is None or before.runat != ticket.runat:
        indexed.append("runat")
        values.append(_micros(ticket.runat))
    if before is None or before.status != ticket.status:
        indexed.append("status")
        values.append(ticket.status.value)
    if before is None or before.expires_at != ticket.expires_at:
        indexed.append("expires_at")
        values.append(_micros(ticket.expires_at))
    values.append(ticket.id)
    return _update_sql(tuple(indexed)), values


def _event_values(event: Event) -> tuple[Any, ...]:
    """Return the parameters of `_INSERT_EVENT` for `event`."""
    status_before = event.status_before
    status_after = event.status_after
    return (
        event.ticket_id,
        event.version,
        event.kind.value,
        to_micros(event.at),
        event.actor,
        None if status_before is None else status_before.value,
        None if status_after is None else status_after.value,
        _encode_json(event.changes),
        event.schema_version,
    )


def _event_from_row(row: tuple[Any, ...]) -> Event:
    return construct_unchecked(
        Event,
        {
            "seq": row[0],
            "ticket_id": row[1],
            "version": row[2],
            "kind": _KINDS[row[3]],
            "at": from_micros(row[4]),
            "actor": row[5],
            "status_before": None if row[6] is None else _STATUSES[row[6]],
            "status_after": None if row[7] is None else _STATUSES[row[7]],
            "changes": _decode_json(row[8]),
            "schema_version": row[9],
        },
    )


class SQLiteTransaction:
    """The engine's view of the open write transaction on the writer connection.

    `appended` counts the events written through it, so the store can tell
    which jobs changed something.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.appended = 0
        # Rows as read in this job, by id, so `append` can SET only changed indexed columns.
        self._read: dict[str, Ticket] = {}

    def start_job(self) -> None:
        """Forget the rows read so far: a rolled-back job may have changed them."""
        self._read.clear()

    def _remember(self, ticket: Ticket) -> Ticket:
        self._read[ticket.id] = ticket
        return ticket

    def load(self, ticket_id: str) -> Ticket | None:
        row = self._connection.execute(_SELECT_TICKET, (ticket_id,)).fetchone()
        return None if row is None else self._remember(_ticket_from_row(row))

    def last_version(self, ticket_id: str) -> int:
        row = self._connection.execute(_SELECT_LAST_VERSION, (ticket_id,)).fetchone()
        return int(row[0] or 0)

    def due(self, now: datetime, limit: int) -> list[Ticket]:
        # No row locks are needed: BEGIN IMMEDIATE already gives this
        # transaction the only write lock on the file, across processes.
        rows = self._connection.execute(_SELECT_DUE, (to_micros(now), limit)).fetchall()
        return [self._remember(_ticket_from_row(row)) for row in rows]

    def expired(self, now: datetime, limit: int) -> list[Ticket]:
        rows = self._connection.execute(_SELECT_EXPIRED, (to_micros(now), limit)).fetchall()
        return [self._remember(_ticket_from_row(row)) for row in rows]

    def next_due_at(self) -> datetime | None:
        row = self._connection.execute(_SELECT_NEXT_DUE).fetchone()
        return _instant(row[0])

    def append(self, event: Event, ticket: Ticket | None) -> int:
        connection = self._connection
        try:
            cursor = connection.execute(_INSERT_EVENT, _event_values(event))
        except sqlite3.IntegrityError as exc:
            raise self._version_conflict(event) from exc
        seq: int = cursor.lastrowid  # type: ignore[assignment]  # an INSERT always sets it

        row_before = self._read.pop(event.ticket_id, None)
        if ticket is None:
            connection.execute(_DELETE_TICKET, (event.ticket_id,))
        elif event.kind is EventKind.PUT:
            connection.execute(_REPLACE_TICKET, (ticket.id, *_ticket_values(ticket), seq))
        else:
            connection.execute(*_update_values(row_before, ticket))
        self.appended += 1
        return seq

    def append_many(self, changes: Sequence[tuple[Event, Ticket]]) -> None:
        """Append each event and update its ticket's row, with one `executemany` per statement.

        The end state is that of `append` called for each pair in order. The
        caller must pass only existing rows that stay (no put, no removal),
        each ticket at most once, because the row updates run after all event
        inserts.
        """
        connection = self._connection
        # executemany binds and runs one row at a time, so when a row fails
        # this list contains the event that failed.
        inserting: list[Event] = []

        def event_rows() -> Iterator[tuple[Any, ...]]:
            for event, _ in changes:
                inserting[:] = [event]
                yield _event_values(event)

        try:
            connection.executemany(_INSERT_EVENT, event_rows())
        except sqlite3.IntegrityError as exc:
            raise self._version_conflict(inserting[0]) from exc

        # Rows differ in which indexed columns changed, so group them by statement.
        updates: dict[str, list[list[Any]]] = {}
        read = self._read
        for event, ticket in changes:
            sql, values = _update_values(read.pop(event.ticket_id, None), ticket)
            updates.setdefault(sql, []).append(values)
        for sql, rows in updates.items():
            connection.executemany(sql, rows)
        self.appended += len(changes)

    def _version_conflict(self, event: Event) -> VersionConflict:
        # UNIQUE (ticket_id, version): another writer appended this version
        # first, so the decision was made on a stale row.
        return VersionConflict(event.ticket_id, event.version - 1, self.last_version(event.ticket_id))


def select_ticket(connection: sqlite3.Connection, ticket_id: str) -> Ticket | None:
    row = connection.execute(_SELECT_TICKET, (ticket_id,)).fetchone()
    return None if row is None else _ticket_from_row(row)


def select_history(connection: sqlite3.Connection, ticket_id: str) -> list[Event]:
    rows = connection.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE ticket_id = ? ORDER BY version", (ticket_id,)
    ).fetchall()
    return [_event_from_row(row) for row in rows]


def select_events(connection: sqlite3.Connection, after_seq: int, limit: int) -> list[Event]:
    rows = connection.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, max(limit, 0))
    ).fetchall()
    return [_event_from_row(row) for row in rows]


def select_tickets(
    connection: sqlite3.Connection,
    status: TicketStatus | None,
    type: str | None,
    limit: int,
    after_id: str | None,
) -> list[Ticket]:
    conditions: list[str] = []
    parameters: list[Any] = []
    if status is not None:
        conditions.append("status = ?")
        parameters.append(TicketStatus(status).value)
    if type is not None:
        conditions.append("type = ?")
        parameters.append(type)
    if after_id is not None:
        conditions.append("id > ?")
        parameters.append(after_id)
    where = f"WHERE {' AND '.join(conditions)} " if conditions else ""
    parameters.append(max(limit, 0))
    query = f"SELECT {_TICKET_COLUMNS} FROM tickets {where}ORDER BY id LIMIT ?"
    rows = connection.execute(query, parameters).fetchall()
    return [_ticket_from_row(row) for row in rows]


def count_stats(connection: sqlite3.Connection) -> Stats:
    """Count tickets and events in one read transaction, so the numbers agree."""
    connection.execute("BEGIN")
    try:
        by_type_rows = connection.execute("SELECT type, status, count(*) FROM tickets GROUP BY type, status").fetchall()
        # NOTE: this scans the whole log (there is no index on kind), so it
        # costs time in proportion to the number of events.
        kind_rows = connection.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall()
        last_seq = connection.execute("SELECT max(seq) FROM events").fetchone()[0]
    finally:
        connection.execute("COMMIT")

    by_status = empty_status_counts()
    by_type: dict[str, dict[str, int]] = {}
    for type_name, status, count in by_type_rows:
        by_status[status] += count
        by_type.setdefault(type_name, {})[status] = count
    events_by_kind: dict[str, int] = dict(kind_rows)
    return Stats(by_status, by_type, events_by_kind, int(last_seq or 0))
