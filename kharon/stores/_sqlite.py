"""`SQLiteStore`: the embedded default store, one file shared by local processes.

Writes. One writer connection runs every write of this process. Callers queue
jobs, each a function of a `Transaction`. A writer task takes everything
queued and runs it as one batch: one `BEGIN IMMEDIATE` transaction on one hop
to a worker thread, with each job inside its own SAVEPOINT. A job that raises
rolls back to its savepoint only, so its caller gets the exception while the
other jobs commit (group commit). The writer task is a Trio system task
started lazily in each `trio.run`, so one store serves several successive
runs, one at a time.

Reads run on a small pool of separate read connections, one thread hop each.
In WAL mode a reader sees the last commit and neither waits for the writer
nor holds it up, so reads do not queue behind writes or take the write lock
other processes need.

Processes. `BEGIN IMMEDIATE` takes the file's write lock before the engine
reads a row, so a lease's select and update see no other process in between
and no ticket is leased twice. A writer that finds the lock taken waits up to
`busy_timeout`. If SQLITE_BUSY still comes back, the whole batch is retried
with a backoff, and each retry logs a WARNING on `kharon.store.sqlite`.

Where the time goes (docs/benchmarks.md has the figures): on a 2-core VM
shared with other jobs (Python 3.11.7, SQLite 3.40.1), `benchmarks/bench.py`
runs 64 workers that lease and ack no-op tickets at about 9,500 tickets/s,
for about 100 us of CPU per ticket over both threads, which share the GIL.
The writer thread takes about 85 us of it: lease about 44 us and ack about
40 us. About half of the writer's time is SQLite running the statements
(event insert, row update or delete, the selects, COMMIT) and half is Python
(rows to `Ticket` objects, decisions, events, JSON). The Trio side costs
about 18 us per ticket. With 4 workers each batch holds at most 4 tickets,
and the thread hop and COMMIT per batch double the cost per ticket.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import trio

from kharon._commands import (
    DeleteCommand,
    ExpireCommand,
    LeaseCommand,
    LeaseResult,
    PutCommand,
    SettleCommand,
)
from kharon._errors import KharonError, SchemaError, StoreClosed
from kharon._events import Event
from kharon._ticket import Ticket, TicketStatus
from kharon.stores import _engine
from kharon.stores._protocol import Stats
from kharon.stores._sqlite_queries import (
    SQLiteTransaction,
    count_stats,
    select_events,
    select_history,
    select_ticket,
    select_tickets,
)
from kharon.stores._sqlite_schema import DEFAULT_BUSY_TIMEOUT, connect, migrate, open_database

__all__ = ["SQLiteStore", "migrate"]

logger = logging.getLogger("kharon.store.sqlite")

T = TypeVar("T")

# How often a process waiting in `wait_for_change` checks `PRAGMA data_version`
# for commits by other processes, in seconds. It bounds how late a worker
# notices a ticket put by another process, plus one thread hop. Each check is
# one thread hop, so an idle process with a waiting worker makes 20 a second.
_DATA_VERSION_POLL_INTERVAL: Final = 0.05

# Retries of a batch that still gets SQLITE_BUSY after `busy_timeout`, and the
# backoff between them in seconds: 0.05, 0.1, 0.2, ... capped at 1 s.
_BUSY_RETRIES: Final = 8
_BUSY_BACKOFF_FIRST: Final = 0.05
_BUSY_BACKOFF_MAX: Final = 1.0

# Read connections open at once. Reads are short and build their results in
# Python under the GIL, so more connections would mostly add waiting threads.
_READ_CONNECTIONS: Final = 4

_SAVEPOINT: Final = "SAVEPOINT kharon_job"
_ROLLBACK_TO_SAVEPOINT: Final = "ROLLBACK TO kharon_job"
_RELEASE_SAVEPOINT: Final = "RELEASE kharon_job"


class _Busy(Exception):
    """SQLITE_BUSY or SQLITE_LOCKED escaped the busy timeout; retry the whole batch."""


def _is_busy(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) keep the primary code in the low byte.
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class _Job(Generic[T]):
    """One caller's write: the operation, and its outcome once the batch is over."""

    __slots__ = ("caller", "changed", "error", "operation", "result", "wakes")

    def __init__(self, operation: Callable[[SQLiteTransaction], T], wakes: bool, caller: trio.lowlevel.Task) -> None:
        self.operation = operation
        self.wakes = wakes
        # The task waiting for the outcome; the writer reschedules it when the batch ends.
        self.caller = caller
        self.result: T | None = None
        self.error: BaseException | None = None
        self.changed = False


class _RunState:
    """The Trio objects of the store, valid inside one `trio.run` only."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        # Set when a job is queued, a task starts waiting for changes, or the store closes.
        self.work = trio.Event()
        self.changed = trio.Event()
        self.watchers = 0
        self.next_probe_at = -math.inf
        self.writer_running = False
        self.writer_stopped = trio.Event()
        self.read_limiter = trio.CapacityLimiter(_READ_CONNECTIONS)
        self.reads_in_flight = 0
        self.reads_finished = trio.Event()


class SQLiteStore:
    """A `Store` in one SQLite file, safe to share between processes of one machine.

    The constructor opens (or creates) the file, switches it to WAL and applies
    the migrations. It raises `SchemaError` when the file is not a Kharon
    database or is newer than this code. `busy_timeout` is how long, in
    seconds, a write waits for another process's write lock before retrying.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)):
            raise TypeError(f"busy_timeout must be a number of seconds, got {busy_timeout!r}")
        if not math.isfinite(busy_timeout) or busy_timeout < 0:
            raise ValueError(f"busy_timeout must be a finite, non-negative number of seconds, got {busy_timeout!r}")
        self.path = os.fspath(path)
        self.busy_timeout = float(busy_timeout)
        self._writer = self._connect()
        try:
            self.schema_version = open_database(self._writer, self.path)
        except BaseException:
            self._writer.close()
            raise
        self._transaction = SQLiteTransaction(self._writer)
        self._data_version = self._read_data_version()
        self._readers: list[sqlite3.Connection] = []
        self._pending: list[_Job[Any]] = []
        self._run: _RunState | None = None
        self._closed = False
        # Times waiters were woken; see `change_token`.
        self._change_count = 0
        # Write transactions committed by this store; tests use it to see batching.
        self.committed_batches = 0

    def _connect(self) -> sqlite3.Connection:
        try:
            return connect(self.path, busy_timeout=self.busy_timeout)
        except sqlite3.Error as exc:
            raise SchemaError(
                f"cannot open {self.path} as a SQLite database: {exc}; check that the directory exists and is writable"
            ) from exc

    def _connect_reader(self) -> sqlite3.Connection:
        connection = self._connect()
        try:
            connection.execute("PRAGMA query_only = ON")
        except BaseException:
            connection.close()
            raise
        return connection

    # -- writes --------------------------------------------------------------

    async def put(self, commands: Sequence[PutCommand]) -> list[Ticket]:
        return await self._write(lambda tx: _engine.put(tx, commands), wakes=True)

    async def settle(self, command: SettleCommand) -> Ticket | None:
        return await self._write(lambda tx: _engine.settle(tx, command), wakes=True)

    async def delete(self, command: DeleteCommand) -> bool:
        return await self._write(lambda tx: _engine.delete(tx, command), wakes=False)

    async def lease(self, command: LeaseCommand) -> LeaseResult:
        return await self._write(lambda tx: _engine.lease(tx, command), wakes=False)

    async def expire(self, command: ExpireCommand) -> int:
        return await self._write(lambda tx: _engine.expire(tx, command), wakes=False)

    async def _write(self, operation: Callable[[SQLiteTransaction], T], *, wakes: bool) -> T:
        """Queue `operation` for the next batch and return its result.

        Once queued, the caller waits in a sleep that cancellation cannot end.
        So a write it started is either committed and reported, or failed and
        raised, and a cancellation arrives at the caller's next checkpoint.
        This works like a shielded wait on a `trio.Event`, without the cancel
        scope and the event per call.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        run = self._run_state()
        job: _Job[T] = _Job(operation, wakes, trio.lowlevel.current_task())
        self._pending.append(job)
        self._start_writer(run)
        run.work.set()
        await trio.lowlevel.wait_task_rescheduled(_cannot_abort)
        error = job.error
        if error is not None:
            job.error = None
            raise error
        return job.result  # type: ignore[return-value]

    def _start_writer(self, run: _RunState) -> None:
        if not run.writer_running:
            run.writer_running = True
            trio.lowlevel.spawn_system_task(self._write_forever, run, name=f"kharon sqlite writer {self.path}")

    async def _write_forever(self, run: _RunState) -> None:
        """Run queued jobs in batches until the store closes or the Trio run ends.

        This is a system task: an exception escaping it would crash the run, so
        every failure is delivered to the jobs instead.
        """
        try:
            while True:
                if not self._pending:
                    if self._closed:
                        return
                    run.work = trio.Event()
                    await self._wait_idle(run)
                    continue

                jobs = self._pending
                self._pending = []
                with trio.CancelScope(shield=True):
                    foreign_change = await trio.to_thread.run_sync(self._run_batch, jobs)
                for job in jobs:
                    trio.lowlevel.reschedule(job.caller)

                run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
                if foreign_change or any(job.wakes and job.changed for job in jobs):
                    self._wake(run)
        finally:
            run.writer_running = False
            run.writer_stopped.set()

    async def _wait_idle(self, run: _RunState) -> None:
        """Wait for work; while tasks wait for changes, check for other processes' commits."""
        if run.watchers == 0:
            await run.work.wait()
            return
        with trio.move_on_at(run.next_probe_at):
            await run.work.wait()
            return
        run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
        try:
            changed = await trio.to_thread.run_sync(self._probe_data_version)
        except sqlite3.Error as exc:
            logger.warning("checking %s for commits by other processes failed: %s", self.path, exc)
            changed = True
        if changed:
            self._wake(run)

    def _run_batch(self, jobs: list[_Job[Any]]) -> bool:
        """Commit `jobs` in one transaction, retrying on SQLITE_BUSY; runs in a worker thread.

        Return True when another connection committed since the last check.
        """
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                self._commit_batch(jobs)
            except _Busy as exc:
                if attempt == _BUSY_RETRIES:
                    _fail_all(jobs, partial(self._busy_error, exc.__cause__))
                    break
                delay = min(_BUSY_BACKOFF_FIRST * 2**attempt, _BUSY_BACKOFF_MAX)
                logger.warning(
                    "%s is locked by another process: retrying a batch of %d writes in %.2f s (retry %d of %d)",
                    self.path,
                    len(jobs),
                    delay,
                    attempt + 1,
                    _BUSY_RETRIES,
                )
                time.sleep(delay)
            except sqlite3.Error as exc:
                _fail_all(jobs, partial(self._batch_error, exc))
                break
            except Exception as exc:
                # A bug in the store itself. The writer is a system task and must
                # not raise, so every caller in the batch gets the error instead.
                logger.error("batch of %d writes to %s failed: %r", len(jobs), self.path, exc, exc_info=exc)
                _fail_all(jobs, partial(self._batch_error, exc))
                break
            else:
                self.committed_batches += 1
                break
        try:
            return self._probe_data_version()
        except sqlite3.Error:
            return True

    def _commit_batch(self, jobs: list[_Job[Any]]) -> None:
        connection = self._writer
        transaction = self._transaction
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise _Busy from exc
            raise
        try:
            for job in jobs:
                job.result = None
                job.error = None
                appended_before = transaction.appended
                transaction.start_job()
                connection.execute(_SAVEPOINT)
                try:
                    job.result = job.operation(transaction)
                except Exception as exc:
                    if _is_busy(exc):
                        raise _Busy from exc
                    connection.execute(_ROLLBACK_TO_SAVEPOINT)
                    connection.execute(_RELEASE_SAVEPOINT)
                    job.error = self._job_error(exc)
                    job.changed = False
                else:
                    connection.execute(_RELEASE_SAVEPOINT)
                    job.changed = transaction.appended > appended_before
            try:
                connection.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    raise _Busy from exc
                raise
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _job_error(self, exc: Exception) -> BaseException:
        if isinstance(exc, sqlite3.Error):
            error = KharonError(f"SQLite write to {self.path} failed, this write was rolled back: {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _batch_error(self, exc: Exception) -> KharonError:
        error = KharonError(f"SQLite write to {self.path} failed, nothing was written: {exc}")
        error.__cause__ = exc
        return error

    def _busy_error(self, cause: BaseException | None) -> KharonError:
        error = KharonError(
            f"{self.path} stayed locked by another process through {_BUSY_RETRIES + 1} tries of "
            f"{self.busy_timeout} s each; nothing was written. Check for a process holding a long "
            "write transaction on this file"
        )
        error.__cause__ = cause
        return error

    def _read_data_version(self) -> int:
        return int(self._writer.execute("PRAGMA data_version").fetchone()[0])

    def _probe_data_version(self) -> bool:
        """Return True when another connection committed since the last probe.

        SQLite changes a connection's data_version only for commits made by
        other connections (https://www.sqlite.org/pragma.html#pragma_data_version),
        so a change here means another process, or another store, wrote.
        """
        version = self._read_data_version()
        changed = version != self._data_version
        self._data_version = version
        return changed

    def _wake(self, run: _RunState) -> None:
        self._change_count += 1
        run.changed.set()
        run.changed = trio.Event()

    # -- reads ---------------------------------------------------------------

    async def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        self._check_open()
        run = self._run_state()
        async with run.read_limiter:
            self._check_open()
            # A one-item list, so the thread can hand back a connection it opened.
            holder = [self._readers.pop()] if self._readers else []
            run.reads_in_flight += 1
            try:
                return await trio.to_thread.run_sync(self._read_in_thread, holder, operation)
            except sqlite3.Error as exc:
                raise KharonError(f"SQLite read from {self.path} failed: {exc}") from exc
            finally:
                if holder:
                    self._readers.append(holder[0])
                run.reads_in_flight -= 1
                if run.reads_in_flight == 0:
                    run.reads_finished.set()
                    run.reads_finished = trio.Event()

    def _read_in_thread(self, holder: list[sqlite3.Connection], operation: Callable[[sqlite3.Connection], T]) -> T:
        if not holder:
            holder.append(self._connect_reader())
        return operation(holder[0])

    async def get(self, ticket_id: str) -> Ticket | None:
        return await self._read(lambda connection: select_ticket(connection, ticket_id))

    async def history(self, ticket_id: str) -> list[Event]:
        return await self._read(lambda connection: select_history(connection, ticket_id))

    async def events(self, *, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        return await self._read(lambda connection: select_events(connection, after_seq, limit))

    async def list_tickets(
        self,
        *,
        status: TicketStatus | None = None,
        type: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> list[Ticket]:
        return await self._read(lambda connection: select_tickets(connection, status, type, limit, after_id))

    async def stats(self) -> Stats:
        return await self._read(count_stats)

    # -- waiting -------------------------------------------------------------

    def change_token(self) -> int:
        return self._change_count

    async def wait_for_change(self, since: int | None = None) -> None:
        """Return when a write may have made a ticket due.

        A put, retry or other settle call in this process wakes the waiter at
        once. Commits by other processes are seen within
        `_DATA_VERSION_POLL_INTERVAL` (50 ms) plus one thread hop. It also
        returns early, for example after another process leased a ticket.
        """
        self._check_open()
        if since is not None and since != self._change_count:
            await trio.lowlevel.checkpoint()
            return
        run = self._run_state()
        self._start_writer(run)
        changed = run.changed
        run.watchers += 1
        if run.watchers == 1:
            run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
        # Wake an idle writer, so it starts checking for other processes' commits.
        run.work.set()
        try:
            await changed.wait()
        finally:
            run.watchers -= 1

    # -- lifecycle -----------------------------------------------------------

    def _run_state(self) -> _RunState:
        token = trio.lowlevel.current_trio_token()
        run = self._run
        if run is None or run.token is not token:
            run = self._run = _RunState(token)
        return run

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"the SQLite store {self.path} is closed")

    async def close(self) -> None:
        """Finish the queued writes, stop the writer and close the connections.

        Writes queued before `close` commit (or fail) as usual; calls made
        after it raise `StoreClosed`. Closing twice does nothing.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        run = self._run_state()
        with trio.CancelScope(shield=True):
            if run.writer_running:
                run.work.set()
                await run.writer_stopped.wait()
            # Waiters return and see the closed store on their next call.
            self._wake(run)
            while run.reads_in_flight:
                await run.reads_finished.wait()
            await trio.to_thread.run_sync(self._close_connections)

    def _close_connections(self) -> None:
        for connection in self._readers:
            connection.close()
        self._readers.clear()
        self._writer.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SQLiteStore {self.path!r} {state}>"


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    # A queued write cannot be taken back, so its caller waits for the outcome.
    # Trio then delivers the cancellation at the caller's next checkpoint.
    return trio.lowlevel.Abort.FAILED


def _fail_all(jobs: list[_Job[Any]], make_error: Callable[[], BaseException]) -> None:
    # One exception object per job: each caller raises its own, in its own task.
    for job in jobs:
        job.result = None
        job.changed = False
        job.error = make_error()
