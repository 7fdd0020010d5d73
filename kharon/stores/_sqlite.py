"""`SQLiteStore`: the embedded default store, one file shared by local processes.

Writes. One writer connection runs every write of this process, in one
long-lived writer thread per store (`kharon.stores._sqlite_writer`). Callers
queue jobs, each a function of a `Transaction`, and sleep. The thread takes
everything queued and runs it as one batch: one `BEGIN IMMEDIATE`
transaction, with each job inside its own SAVEPOINT. A job that raises rolls
back to its savepoint only, so its caller gets the exception while the other
jobs commit (group commit). The thread hands each batch back to the Trio run
that queued it with `TrioToken.run_sync_soon`, so one store serves several
successive runs, one at a time. While tasks wait in `wait_for_change`, a Trio
system task queues probes, on which the thread checks `PRAGMA data_version`
for commits by other processes.

Reads run on a small pool of separate read connections, one thread hop each.
In WAL mode a reader sees the last commit and neither waits for the writer
nor holds it up, so reads do not queue behind writes or take the write lock
other processes need.

Processes. `BEGIN IMMEDIATE` takes the file's write lock before the engine
reads a row, so a lease's select and update see no other process in between
and no ticket is leased twice. A writer that finds the lock taken waits up to
`busy_timeout`. If SQLITE_BUSY still comes back, the whole batch is retried
with a backoff, and each retry logs a WARNING on `kharon.store.sqlite`.

Where the time goes (docs/benchmarks.md has the figures). On a 2-core VM
shared with other jobs (Python 3.11.7, SQLite 3.40.1), `benchmarks/bench.py`
runs 64 workers that lease and ack no-op tickets at about 8,800 tickets/s.
That costs about 107 us of CPU per ticket over both threads, which share the
GIL.
The writer thread takes about 70 us of it for the lease and the ack. About half of the writer's time is SQLite
running the statements (event insert, row update or delete, the selects,
COMMIT) and half is Python (rows to `Ticket` objects, decisions, events,
JSON). The Trio side costs about 35 us per ticket. With 4 workers each batch
contains at most 4 tickets, and the hand-off and COMMIT per batch double the
cost per ticket, to about 215 us.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar

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
from kharon.stores._sqlite_writer import PROBE, WriteJob, WriterThread

__all__ = ["SQLiteStore", "migrate"]

logger = logging.getLogger("kharon.store.sqlite")

T = TypeVar("T")

# How often a process waiting in `wait_for_change` checks `PRAGMA data_version`
# for commits by other processes, in seconds. It bounds how late a worker
# notices a ticket put by another process, plus one hand-off to the writer
# thread. An idle process with a waiting worker makes 20 checks a second.
_DATA_VERSION_POLL_INTERVAL: Final = 0.05

# Read connections open at once. Reads are short and build their results in
# Python under the GIL, so more connections would mostly add waiting threads.
_READ_CONNECTIONS: Final = 4


async def _wait_for_writer_thread() -> None:
    """Sleep until the writer thread hands the caller's job back.

    Cancellation cannot end the sleep: a queued write cannot be taken back, so
    its caller waits for the outcome and Trio delivers the cancellation at the
    caller's next checkpoint. tests/conftest.py wraps this function to pause
    the mock clock's autojump while a caller waits for the thread.
    """
    await trio.lowlevel.wait_task_rescheduled(_cannot_abort)


class _RunState:
    """The Trio objects of the store, valid inside one `trio.run` only."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.changed = trio.Event()
        self.watchers = 0
        # Set when a task starts waiting for changes or the store closes.
        self.watching = trio.Event()
        self.next_probe_at = -math.inf
        self.prober_running = False
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
        writer = self._connect()
        try:
            self.schema_version = open_database(writer, self.path)
            self._writer_thread = WriterThread(writer, self.path, self.busy_timeout)
        except BaseException:
            writer.close()
            raise
        # A store dropped without close() stops its thread, which closes the connection.
        weakref.finalize(self, self._writer_thread.stop)
        self._readers: list[sqlite3.Connection] = []
        self._run: _RunState | None = None
        self._closed = False
        self._close_finished = trio.Event()
        # Times waiters were woken; see `change_token`.
        self._change_count = 0

    @property
    def committed_batches(self) -> int:
        """Write transactions committed by this store; tests use it to see batching."""
        return self._writer_thread.committed_batches

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
        """Queue `operation` for the writer thread's next batch and return its result.

        Once queued, the caller waits in a sleep that cancellation cannot end.
        So a write it started is either committed and reported, or failed and
        raised, and a cancellation arrives at the caller's next checkpoint.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        run = self._run_state()
        job: WriteJob[T] = WriteJob(operation, wakes, trio.lowlevel.current_task(), run.token, self._batch_finished)
        self._writer_thread.submit(job)
        await _wait_for_writer_thread()
        error = job.error
        if error is not None:
            job.error = None
            raise error
        return job.result  # type: ignore[return-value]

    def _batch_finished(self, jobs: list[WriteJob[Any]], foreign_change: bool) -> None:
        """Wake the callers of a finished batch; runs in the Trio thread, called by the writer thread."""
        for job in jobs:
            trio.lowlevel.reschedule(job.caller)
        run = self._run_state()
        run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
        if foreign_change or any(job.wakes and job.changed for job in jobs):
            self._wake(run)

    def _start_prober(self, run: _RunState) -> None:
        if not run.prober_running:
            run.prober_running = True
            trio.lowlevel.spawn_system_task(self._probe_forever, run, name=f"kharon sqlite prober {self.path}")

    async def _probe_forever(self, run: _RunState) -> None:
        """While tasks wait for changes, have the writer thread check for other processes' commits.

        Every batch also checks, so a probe is due only `_DATA_VERSION_POLL_INTERVAL`
        after the last batch or probe. This is a system task: it ends when the
        store closes, or is cancelled when the Trio run ends.
        """
        try:
            while not self._closed:
                if run.watchers == 0:
                    run.watching = trio.Event()
                    await run.watching.wait()
                    continue
                if trio.current_time() < run.next_probe_at:
                    await trio.sleep_until(run.next_probe_at)
                    continue
                run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
                job: WriteJob[None] = WriteJob(
                    PROBE, False, trio.lowlevel.current_task(), run.token, self._batch_finished
                )
                self._writer_thread.submit(job)
                await _wait_for_writer_thread()
        finally:
            run.prober_running = False

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
        self._start_prober(run)
        changed = run.changed
        run.watchers += 1
        if run.watchers == 1:
            run.next_probe_at = trio.current_time() + _DATA_VERSION_POLL_INTERVAL
        # Wake an idle prober, so it starts checking for other processes' commits.
        run.watching.set()
        try:
            await changed.wait()
        finally:
            run.watchers -= 1

    # -- lifecycle -----------------------------------------------------------

    def _run_state(self) -> _RunState:
        token = trio.lowlevel.current_trio_token()
        run = self._run
        if run is None or run.token is not token:
            if run is not None and _run_is_alive(run.token):
                raise RuntimeError(
                    f"the SQLite store {self.path} is in use by another trio.run that is still running; "
                    "open one SQLiteStore per run (they can share the file)"
                )
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
            # A second call returns once the first has finished closing.
            with trio.CancelScope(shield=True):
                await self._close_finished.wait()
            return
        self._closed = True
        run = self._run_state()
        with trio.CancelScope(shield=True):
            writer_thread = self._writer_thread
            if writer_thread.started:
                # Runs after every write queued before it, then closes the writer
                # connection in the writer thread and ends that thread.
                job: WriteJob[None] = WriteJob(
                    PROBE, False, trio.lowlevel.current_task(), run.token, self._batch_finished
                )
                writer_thread.submit(job, last=True)
                await _wait_for_writer_thread()
            else:
                writer_thread.stop()
            # Waiters return and see the closed store on their next call; the prober ends.
            self._wake(run)
            run.watching.set()
            while run.reads_in_flight:
                await run.reads_finished.wait()
            await trio.to_thread.run_sync(self._close_connections)
            self._close_finished.set()

    def _close_connections(self) -> None:
        for connection in self._readers:
            connection.close()
        self._readers.clear()
        self._writer_thread.close_unstarted()

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


def _run_is_alive(token: trio.lowlevel.TrioToken) -> bool:
    """Return True while the Trio run of `token` has not finished."""
    try:
        token.run_sync_soon(_do_nothing)
    except trio.RunFinishedError:
        return False
    return True


def _do_nothing() -> None:
    pass


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    # A queued write cannot be taken back, so its caller waits for the outcome.
    # Trio then delivers the cancellation at the caller's next checkpoint.
    return trio.lowlevel.Abort.FAILED
