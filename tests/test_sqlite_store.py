"""SQLiteStore beyond the shared store contract: files, migrations, batching, processes.

The contract suite (tests/store_contract.py) checks what every store does.
This module checks what only the SQLite store has: the schema in a real file,
group commit, cancellation while a batch runs, SQLITE_BUSY handling and
several processes on one file.
"""

from __future__ import annotations

import gc
import json
import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from sqlite_utils import Database

from kharon import (
    BackoffDelay,
    InvalidTransition,
    Kharon,
    KharonError,
    SchemaError,
    StoreClosed,
    Ticket,
    TicketNotFound,
    TicketStatus,
    VersionConflict,
)
from kharon._commands import LeaseCommand, PutCommand, SettleCommand, SettleOperation
from kharon.stores import SQLiteStore, migrate

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2030, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=1)
PROCESS_TIME = timedelta(seconds=30)


def put_command(type: str = "email", ticket_id: str | None = None) -> PutCommand:
    ticket = Ticket(type=type) if ticket_id is None else Ticket(id=ticket_id, type=type)
    return PutCommand(ticket, NOW, "test")


def lease_command(limit: int = 10) -> LeaseCommand:
    return LeaseCommand(limit, LATER, PROCESS_TIME, BackoffDelay(), "test")


def settle_command(operation: SettleOperation, ticket_id: str, **options: object) -> SettleCommand:
    return SettleCommand(operation, ticket_id, LATER, "test", **options)  # type: ignore[arg-type]


def schema_rows(path: Path) -> list[dict[str, object]]:
    return list(Database(path)["kharon_schema"].rows)


# -- opening and migrating -------------------------------------------------


def test_new_file_gets_migrations_recorded(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"

    store = SQLiteStore(path)
    trio.run(store.close)

    rows = schema_rows(path)
    assert [(row["version"], row["name"]) for row in rows] == [(1, "init")]
    assert datetime.fromisoformat(str(rows[0]["applied_at"])).tzinfo is not None
    tables = set(Database(path).table_names())
    assert {"events", "tickets", "kharon_schema"} <= tables
    assert store.schema_version == 1


def test_new_file_uses_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"

    migrate(path)

    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_reopen_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    trio.run(SQLiteStore(path).close)
    before = schema_rows(path)

    trio.run(SQLiteStore(path).close)
    version = migrate(path)

    assert version == 1
    assert schema_rows(path) == before


def test_migrate_returns_version(tmp_path: Path) -> None:
    assert migrate(tmp_path / "kharon.db") == 1


def test_concurrent_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    versions: list[int] = []
    start = threading.Barrier(4)

    def open_file() -> None:
        start.wait()
        versions.append(migrate(path))

    threads = [threading.Thread(target=open_file) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert versions == [1, 1, 1, 1]
    assert [row["version"] for row in schema_rows(path)] == [1]


def test_non_sqlite_file_rejected_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    content = b"these are notes, not a database\n" * 200
    path.write_bytes(content)

    with pytest.raises(SchemaError) as caught:
        SQLiteStore(path)

    message = str(caught.value)
    assert str(path) in message
    assert "not a SQLite database" in message
    assert path.read_bytes() == content


def test_non_sqlite_file_rejected_by_migrate(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\x00\x01binary junk" * 100)

    with pytest.raises(SchemaError, match="not a SQLite database"):
        migrate(path)

    assert path.read_bytes() == b"\x00\x01binary junk" * 100


def test_foreign_database_rejected_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    Database(path)["customers"].insert({"id": 1, "name": "Ada"})
    content = path.read_bytes()

    with pytest.raises(SchemaError) as caught:
        SQLiteStore(path)

    message = str(caught.value)
    assert str(path) in message
    assert "not a Kharon database" in message
    assert "customers" in message
    assert path.read_bytes() == content
    assert Database(path).table_names() == ["customers"]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("CREATE VIEW report AS SELECT 1", "not a Kharon database"),
        ("CREATE TABLE kharon_schema (x)", "that Kharon did not create"),
        (
            "CREATE TABLE kharon_schema (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT);"
            "INSERT INTO kharon_schema VALUES (1, '0001_init', '2026-01-01');",
            "lacks the tables events, tickets",
        ),
    ],
    ids=["only-a-view", "foreign-schema-table", "damaged"],
)
def test_odd_database_rejected_untouched(tmp_path: Path, script: str, expected: str) -> None:
    path = tmp_path / "odd.db"
    connection = sqlite3.connect(path)
    connection.executescript(script)
    connection.close()
    content = path.read_bytes()

    with pytest.raises(SchemaError) as caught:
        SQLiteStore(path)

    assert expected in str(caught.value)
    assert path.read_bytes() == content


def test_newer_schema_rejected(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    migrate(path)
    Database(path)["kharon_schema"].insert({"version": 99, "name": "future", "applied_at": NOW.isoformat()})

    with pytest.raises(SchemaError) as caught:
        SQLiteStore(path)

    message = str(caught.value)
    assert "99" in message
    assert "upgrade kharon" in message


def test_missing_directory_raises_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "kharon.db"

    with pytest.raises(SchemaError, match="cannot open"):
        SQLiteStore(path)


def test_busy_timeout_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="busy_timeout"):
        SQLiteStore(tmp_path / "kharon.db", busy_timeout=-1)
    with pytest.raises(TypeError, match="busy_timeout"):
        SQLiteStore(tmp_path / "kharon.db", busy_timeout="5")  # type: ignore[arg-type]


# -- data on disk ------------------------------------------------------------


async def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    async with SQLiteStore(path) as store:
        first, second = await store.put([put_command(), put_command("report")])
        (leased,) = (await store.lease(lease_command(limit=1))).tickets
        await store.settle(settle_command(SettleOperation.FAIL, leased.id, error_reason={"code": 7}))
        expected_tickets = [await store.get(first.id), await store.get(second.id)]
        expected_events = await store.events()

    async with SQLiteStore(path) as reopened:
        tickets = [await reopened.get(first.id), await reopened.get(second.id)]
        events = await reopened.events()

    assert tickets == expected_tickets
    assert events == expected_events
    assert tickets[0] is not None
    assert tickets[0].status == TicketStatus.FAILED
    assert tickets[0].error_reason == {"code": 7}


def test_store_serves_successive_trio_runs(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kharon.db")

    (ticket,) = trio.run(store.put, [put_command()])
    fetched = trio.run(store.get, ticket.id)
    leased = trio.run(store.lease, lease_command())
    trio.run(store.close)

    assert fetched == ticket
    assert [t.id for t in leased.tickets] == [ticket.id]


# -- group commit --------------------------------------------------------------


async def test_concurrent_settles_share_transactions(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        tickets = await store.put([put_command() for _ in range(200)])
        batches_before = store.committed_batches
        results: dict[str, object] = {}

        async def ack(ticket_id: str) -> None:
            results[ticket_id] = await store.settle(settle_command(SettleOperation.ACK, ticket_id, keep=True))

        async with trio.open_nursery() as nursery:
            for ticket in tickets:
                nursery.start_soon(ack, ticket.id)

        batches = store.committed_batches - batches_before
        stats = await store.stats()

    assert len(results) == 200
    assert batches <= 3
    assert stats.by_status["done"] == 200


async def test_failing_job_leaves_batch_intact(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        good, busy, finished = await store.put([put_command(), put_command(), put_command()])
        leased = (await store.lease(lease_command(limit=2))).tickets
        assert [t.id for t in leased] == [good.id, busy.id]
        await store.settle(settle_command(SettleOperation.DONE, finished.id))
        errors: dict[str, BaseException] = {}
        results: dict[str, object] = {}
        batches_before = store.committed_batches

        async def call(name: str, operation: Callable[[], Awaitable[object]]) -> None:
            try:
                results[name] = await operation()
            except Exception as exc:
                errors[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "ack", lambda: store.settle(settle_command(SettleOperation.ACK, good.id)))
            nursery.start_soon(call, "missing", lambda: store.settle(settle_command(SettleOperation.ACK, "nope")))
            nursery.start_soon(
                call, "invalid", lambda: store.settle(settle_command(SettleOperation.RETRY, finished.id))
            )
            # The second ticket of this put is running, so neither is stored.
            nursery.start_soon(
                call, "put-many", lambda: store.put([put_command(ticket_id="fresh"), put_command(ticket_id=busy.id)])
            )
            nursery.start_soon(call, "put", lambda: store.put([put_command(ticket_id="single")]))

        batches = store.committed_batches - batches_before
        fresh = await store.get("fresh")
        single = await store.get("single")
        acked = await store.get(good.id)
        still_running = await store.get(busy.id)
        history = await store.history("fresh")

    assert batches == 1
    assert set(results) == {"ack", "put"}
    assert isinstance(errors["missing"], TicketNotFound)
    assert isinstance(errors["invalid"], InvalidTransition)
    assert isinstance(errors["put-many"], InvalidTransition)
    assert acked is None
    assert single is not None
    assert fresh is None
    assert history == []
    assert still_running is not None
    assert still_running.status == TicketStatus.RUNNING


async def test_put_many_is_one_job(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        batches_before = store.committed_batches

        stored = await store.put([put_command() for _ in range(500)])

        assert len(stored) == 500
        assert store.committed_batches - batches_before == 1


# -- cancellation ----------------------------------------------------------------


async def test_cancelled_before_submission_writes_nothing(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.put([put_command(ticket_id="never")])

        assert scope.cancelled_caught
        assert await store.get("never") is None
        assert await store.history("never") == []


async def test_cancel_after_submission_commits_and_reports(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        (ticket,) = await store.put([put_command()])
        reported: list[object] = []

        async def settle() -> None:
            reported.append(await store.settle(settle_command(SettleOperation.DONE, ticket.id)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(settle)
            # Every task is now blocked: the settle call is queued or in the writer thread.
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

        stored = await store.get(ticket.id)

    assert len(reported) == 1
    assert stored is not None
    assert stored.status == TicketStatus.DONE
    assert reported[0] == stored


# -- errors ------------------------------------------------------------------------


async def test_duplicate_event_version_is_version_conflict(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    async with SQLiteStore(path) as store:
        (ticket,) = await store.put([put_command()])
        # A writer that bypasses the store appends version 2 to the log only.
        rogue = sqlite3.connect(path)
        rogue.execute(
            "INSERT INTO events (ticket_id, version, kind, at, changes, schema_version) "
            "VALUES (?, 2, 'retry', 0, '{}', 1)",
            (ticket.id,),
        )
        rogue.commit()
        rogue.close()

        with pytest.raises(VersionConflict) as caught:
            await store.settle(settle_command(SettleOperation.DONE, ticket.id))

        assert caught.value.ticket_id == ticket.id
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        unchanged = await store.get(ticket.id)
        assert unchanged == ticket


async def test_lease_with_duplicate_version_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    async with SQLiteStore(path) as store:
        first, second, third = await store.put([put_command(ticket_id=f"t-{n}") for n in range(3)])
        # A writer that bypasses the store appends version 2 of the second ticket to the log only.
        rogue = sqlite3.connect(path)
        rogue.execute(
            "INSERT INTO events (ticket_id, version, kind, at, changes, schema_version) "
            "VALUES (?, 2, 'retry', 0, '{}', 1)",
            (second.id,),
        )
        rogue.commit()
        rogue.close()

        with pytest.raises(VersionConflict) as caught:
            await store.lease(lease_command())

        assert caught.value.ticket_id == second.id
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        assert await store.get(first.id) == first
        assert await store.get(third.id) == third
        assert [event.version for event in await store.history(first.id)] == [1]


async def test_base_exception_fails_batch(tmp_path: Path) -> None:
    class Stop(BaseException):
        pass

    def stop(_: object) -> None:
        raise Stop

    async with SQLiteStore(tmp_path / "kharon.db") as store:
        with pytest.raises(KharonError, match="nothing was written") as caught:
            await store._write(stop, wakes=False)
        (ticket,) = await store.put([put_command()])

        assert isinstance(caught.value.__cause__, Stop)
        assert await store.get(ticket.id) == ticket


async def test_busy_file_retried_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "kharon.db"
    migrate(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")

    class ReleaseOnWarning(logging.Handler):
        """Ends the other connection's write transaction when the store logs its first retry."""

        def emit(self, record: logging.LogRecord) -> None:
            if holder.in_transaction:
                holder.execute("COMMIT")

    logger = logging.getLogger("kharon.store.sqlite")
    release = ReleaseOnWarning(level=logging.WARNING)
    logger.addHandler(release)
    caplog.set_level(logging.WARNING, logger="kharon.store.sqlite")
    try:
        async with SQLiteStore(path, busy_timeout=0) as store:
            (ticket,) = await store.put([put_command()])
            stored = await store.get(ticket.id)
    finally:
        logger.removeHandler(release)
        holder.close()

    assert stored == ticket
    warnings = [r for r in caplog.records if r.name == "kharon.store.sqlite" and r.levelno == logging.WARNING]
    assert len(warnings) >= 1
    assert "retrying" in warnings[0].getMessage()


# -- closing -------------------------------------------------------------------------


async def test_close_finishes_queued_writes(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    store = SQLiteStore(path)
    results: list[object] = []

    async def put(ticket_id: str) -> None:
        results.extend(await store.put([put_command(ticket_id=ticket_id)]))

    async with trio.open_nursery() as nursery:
        for number in range(20):
            nursery.start_soon(put, f"ticket-{number}")
        await trio.testing.wait_all_tasks_blocked()
        await store.close()

    assert len(results) == 20
    async with SQLiteStore(path) as reopened:
        assert (await reopened.stats()).by_status["pending"] == 20


async def test_use_after_close_raises(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kharon.db")
    await store.close()

    with pytest.raises(StoreClosed, match="closed"):
        await store.put([put_command()])
    with pytest.raises(StoreClosed):
        await store.get("any")
    with pytest.raises(StoreClosed):
        await store.wait_for_change()
    await store.close()


async def test_close_wakes_waiters(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kharon.db")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.wait_for_change)
        await trio.testing.wait_all_tasks_blocked()
        await store.close()


def writer_threads(path: Path) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"kharon sqlite writer {path}"]


def test_close_ends_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    store = SQLiteStore(path)
    trio.run(store.put, [put_command()])
    (thread,) = writer_threads(path)

    trio.run(store.close)
    thread.join(timeout=10)

    assert thread.daemon
    assert not thread.is_alive()


def test_collected_store_ends_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    store = SQLiteStore(path)
    trio.run(store.put, [put_command()])
    (thread,) = writer_threads(path)

    del store
    gc.collect()
    thread.join(timeout=10)

    assert not thread.is_alive()


# -- wait_for_change -------------------------------------------------------------------


async def test_wait_for_change_wakes_on_put(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        woke = trio.Event()

        async def wait() -> None:
            await store.wait_for_change()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()

            await store.put([put_command()])
            await trio.testing.wait_all_tasks_blocked()

            # The put wakes the waiter directly: no data_version check ran.
            assert woke.is_set()


async def test_wait_for_change_ignores_lease(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    async with SQLiteStore(tmp_path / "kharon.db") as store:
        await store.put([put_command()])
        woke = trio.Event()

        async def wait() -> None:
            await store.wait_for_change()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()

            await store.lease(lease_command())
            await trio.sleep(1)

            assert not woke.is_set()
            nursery.cancel_scope.cancel()


CHILD_PUT = """
import sys
import trio
from datetime import UTC, datetime
from kharon import Ticket
from kharon._commands import PutCommand
from kharon.stores import SQLiteStore

async def main():
    async with SQLiteStore(sys.argv[1]) as store:
        await store.put([PutCommand(Ticket(id="from-child", type="email"), datetime.now(UTC), "child")])

trio.run(main)
"""


@pytest.mark.slow
async def test_wait_for_change_wakes_on_other_process(tmp_path: Path) -> None:
    path = tmp_path / "kharon.db"
    script = tmp_path / "child_put.py"
    script.write_text(CHILD_PUT)
    async with SQLiteStore(path) as store:
        woke = trio.Event()

        async def wait() -> None:
            await store.wait_for_change()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()

            await trio.run_process([sys.executable, str(script), str(path)], cwd=REPO)
            # Seen within one data_version check interval (50 ms); the bound only stops a hang.
            with trio.fail_after(10):
                await woke.wait()

        assert await store.get("from-child") is not None


# -- several processes -------------------------------------------------------------------

CHILD_WORKER = """
import json, os, sys, time
import trio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from kharon import BackoffDelay, Ticket
from kharon._commands import LeaseCommand, PutCommand, SettleCommand, SettleOperation
from kharon.stores import SQLiteStore

path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ready_dir = os.path.dirname(path)
DEADLINE = time.monotonic() + 60

# Start together: announce this process, then wait for the other one.
open(os.path.join(ready_dir, f"ready-{name}"), "w").close()
while len([f for f in os.listdir(ready_dir) if f.startswith("ready-")]) < 2:
    if time.monotonic() > DEADLINE:
        sys.exit("the other process never started")
    time.sleep(0.005)

async def main():
    leased_ids = []
    async with SQLiteStore(path) as store:
        async def lease_and_ack(limit):
            now = datetime.now(UTC)
            result = await store.lease(LeaseCommand(limit, now, timedelta(seconds=60), BackoffDelay(), name))
            for ticket in result.tickets:
                leased_ids.append(ticket.id)
                await store.settle(SettleCommand(SettleOperation.ACK, ticket.id, now, name,
                                                 lease=ticket.attempts, lease_version=ticket.lease_version))
            return len(result.tickets)

        for start in range(0, count, 5):
            now = datetime.now(UTC)
            await store.put([PutCommand(Ticket(id=f"{name}-{n}", type="job"), now, name)
                             for n in range(start, min(start + 5, count))])
            await lease_and_ack(4)
        # Drain: every ticket put so far by either process.
        while await lease_and_ack(50):
            if time.monotonic() > DEADLINE:
                sys.exit("draining did not finish in time")
    print(json.dumps(leased_ids))

trio.run(main)
"""


@pytest.mark.slow
def test_two_processes_never_lease_twice(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    script = tmp_path / "child_worker.py"
    script.write_text(textwrap.dedent(CHILD_WORKER))
    migrate(path)
    per_process = 200

    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), name, str(per_process)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = []
    for child in children:
        stdout, stderr = child.communicate(timeout=90)
        outputs.append((child.returncode, stdout, stderr))

    leased: list[str] = []
    for returncode, stdout, stderr in outputs:
        assert returncode == 0, stderr
        assert "database is locked" not in stderr
        assert "Traceback" not in stderr
        leased.extend(json.loads(stdout))
    assert len(leased) == len(set(leased))
    assert set(leased) == {f"{name}-{n}" for name in ("a", "b") for n in range(per_process)}
    for _, stdout, _ in outputs:
        assert json.loads(stdout), "each process leases tickets after each of its puts"


def test_wait_for_change_wakes_on_second_store(tmp_path: Path) -> None:
    """A second store on the same file acts as another process, inside one trio run."""
    path = tmp_path / "kharon.db"
    first = SQLiteStore(path)
    second = SQLiteStore(path)

    async def main() -> bool:
        woke = trio.Event()

        async def wait() -> None:
            await first.wait_for_change()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await second.put([put_command(ticket_id="elsewhere")])
            with trio.fail_after(10):
                await woke.wait()
        await first.close()
        await second.close()
        return woke.is_set()

    assert trio.run(main)


def test_second_concurrent_run_rejected(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kharon.db")
    in_first_run = threading.Event()
    errors: list[BaseException] = []

    def second_run() -> None:
        if not in_first_run.wait(timeout=30):
            return

        async def put() -> None:
            await Kharon(store).put(Ticket(id="b", type="email"))

        try:
            trio.run(put)
        except RuntimeError as exc:
            errors.append(exc)

    async def first_run() -> None:
        await Kharon(store).put(Ticket(id="a", type="email"))
        in_first_run.set()
        await trio.to_thread.run_sync(thread.join)
        await store.close()

    # A daemon, so a failing first run cannot leave the test process hanging.
    thread = threading.Thread(target=second_run, daemon=True)
    thread.start()
    trio.run(first_run)

    (error,) = errors
    assert "in use by another trio.run" in str(error)


async def test_concurrent_close_waits_for_first(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kharon.db")
    await Kharon(store).put(Ticket(id="a", type="email"))
    finished: list[str] = []

    async def close(name: str) -> None:
        await store.close()
        finished.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close, "first")
        nursery.start_soon(close, "second")

    assert sorted(finished) == ["first", "second"]
    assert not store._writer_thread._thread.is_alive()  # type: ignore[union-attr]
