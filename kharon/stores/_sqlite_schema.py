"""Opening a Kharon SQLite file: connection settings, schema checks, migrations.

The schema lives in numbered files `NNNN_name.sql`. A wheel ships them as
`kharon/_migrations/sqlite/`; a source checkout keeps them in
`<repo>/migrations/sqlite/`. Each file is applied in its own
`BEGIN IMMEDIATE` transaction together with its row in `kharon_schema`, so
several processes opening a new file at once apply it exactly once.

A file is checked before anything is written to it: a file that is not SQLite,
a SQLite database with tables but no `kharon_schema`, or a schema newer than
this code raises `SchemaError` and leaves the file as it was.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path

from sqlite_utils import Database

from kharon._errors import SchemaError

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "SCHEMA_TABLE",
    "Migration",
    "connect",
    "known_migrations",
    "migrate",
    "open_database",
    "split_statements",
]

# How long a connection waits for another connection's write lock before
# SQLite returns SQLITE_BUSY, in seconds. Kharon writers hold the lock for one
# group commit (milliseconds), so 5 s runs out only when a process is stuck.
# The store then retries the batch with a backoff before giving up.
DEFAULT_BUSY_TIMEOUT = 5.0

SCHEMA_TABLE = "kharon_schema"

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def _migration_directory() -> Traversable:
    """Return the folder of the SQLite migrations: the wheel copy first, then the source tree."""
    packaged = importlib.resources.files("kharon") / "_migrations" / "sqlite"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parents[2] / "migrations" / "sqlite"
    if source.is_dir():
        return source
    raise SchemaError(
        f"the SQLite migrations are missing: looked in {packaged} and {source}; "
        "reinstall kharon, or run from a complete source checkout"
    )


@cache
def known_migrations() -> tuple[Migration, ...]:
    """Return the migrations shipped with this code, in version order."""
    directory = _migration_directory()
    found: list[Migration] = []
    for entry in directory.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaError(f"the SQLite migrations in {directory} are not numbered 1, 2, 3, ...: found {versions}")
    return tuple(found)


def split_statements(sql: str) -> list[str]:
    """Split a script into complete statements, each ending at a semicolon.

    `sqlite3.Connection.executescript` commits any open transaction first, so a
    migration runs statement by statement inside the store's own transaction.
    """
    statements: list[str] = []
    start = 0
    for position, char in enumerate(sql):
        if char != ";":
            continue
        candidate = sql[start : position + 1]
        if sqlite3.complete_statement(candidate):
            statements.append(candidate.strip())
            start = position + 1
    rest = sql[start:]
    if _strip_comments(rest).strip():
        raise SchemaError(f"the migration ends with an incomplete statement: {rest.strip()[:80]!r}")
    return statements


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def connect(path: str | os.PathLike[str], *, busy_timeout: float) -> sqlite3.Connection:
    """Open a connection in autocommit mode; the store issues BEGIN and COMMIT itself.

    `check_same_thread` is off because the store uses each connection from
    more than one thread, one thread at a time. Read connections move between
    Trio's worker threads. The writer connection runs the migrations in the
    constructor's thread and is then used only by the store's writer thread.
    """
    connection = sqlite3.connect(
        os.fspath(path),
        timeout=busy_timeout,
        isolation_level=None,
        check_same_thread=False,
        cached_statements=256,
    )
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    except sqlite3.Error:
        connection.close()
        raise
    return connection


def _configure(connection: sqlite3.Connection, path: str) -> None:
    # WAL lets readers run while one writer commits. With synchronous=NORMAL a
    # commit survives a process crash, and a power loss may lose the last
    # commits but does not corrupt the file
    # (https://www.sqlite.org/pragma.html#pragma_synchronous).
    mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise SchemaError(
            f"cannot switch {path} to WAL mode (journal_mode stayed {mode!r}); WAL needs a local, "
            "writable file system with shared memory, so move the file there"
        )
    connection.execute("PRAGMA synchronous = NORMAL")
    # The schema has no foreign keys, so PRAGMA foreign_keys stays at its default (off).


def _applied_version(connection: sqlite3.Connection) -> int:
    row = connection.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}").fetchone()
    return int(row[0] or 0)


def _check_file(connection: sqlite3.Connection, path: str) -> int:
    """Return the applied schema version; raise SchemaError for a file that is not ours.

    Only reads: a rejected file is left untouched.
    """
    try:
        database = Database(connection, recursive_triggers=False, execute_plugins=False)
        tables = set(database.table_names())
        views = set(database.view_names())
    except sqlite3.DatabaseError as exc:
        raise SchemaError(
            f"{path} is not a SQLite database ({exc}); pass the path of a Kharon database, "
            "or a new file name to create one"
        ) from exc
    foreign = {name for name in tables | views if not name.startswith("sqlite_")}
    if SCHEMA_TABLE not in tables:
        if foreign:
            raise SchemaError(
                f"{path} is a SQLite database but not a Kharon database: it has the tables or views "
                f"{', '.join(sorted(foreign))} and no {SCHEMA_TABLE} table; "
                "pass a new file name or a file created by Kharon"
            )
        return 0
    try:
        version = _applied_version(connection)
    except sqlite3.DatabaseError as exc:
        raise SchemaError(
            f"{path} has a {SCHEMA_TABLE} table that Kharon did not create ({exc}); "
            "pass a new file name or a file created by Kharon"
        ) from exc
    latest = len(known_migrations())
    if version > latest:
        raise SchemaError(
            f"{path} has schema version {version}, newer than the version {latest} this Kharon "
            "supports; upgrade kharon to open it"
        )
    missing = {"events", "tickets"} - tables
    if version >= 1 and missing:
        raise SchemaError(
            f"{path} records schema version {version} but lacks the tables {', '.join(sorted(missing))}; "
            "the file is damaged: restore it from a backup or start a new file"
        )
    return version


def _apply(connection: sqlite3.Connection, migration: Migration, path: str) -> None:
    """Apply one migration in its own write transaction, unless another process did first."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        if _applied_version(connection) >= migration.version:
            connection.execute("COMMIT")
            return
        for statement in split_statements(migration.sql):
            connection.execute(statement)
        connection.execute(
            f"INSERT INTO {SCHEMA_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, datetime.now(UTC).isoformat()),
        )
        connection.execute("COMMIT")
    except BaseException as exc:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise SchemaError(
                f"migration {migration.version:04d}_{migration.name} failed on {path}: {exc}; "
                "the file is unchanged by this migration"
            ) from exc
        raise


def open_database(connection: sqlite3.Connection, path: str) -> int:
    """Check the file behind `connection`, switch it to WAL and migrate it; return the version."""
    version = _check_file(connection, path)
    _configure(connection, path)
    for migration in known_migrations():
        if migration.version > version:
            _apply(connection, migration, path)
    return _check_file(connection, path)


def migrate(path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> int:
    """Create or upgrade the Kharon database at `path`; return its schema version.

    Raise `SchemaError` when the file is not a Kharon database or is newer than
    this code. Running it again on an up-to-date file changes nothing.
    """
    name = os.fspath(path)
    try:
        connection = connect(name, busy_timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise SchemaError(f"cannot open {name} as a SQLite database: {exc}") from exc
    try:
        return open_database(connection, name)
    finally:
        connection.close()
