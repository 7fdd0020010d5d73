"""The SQLite store's writer thread: one OS thread that owns the writer connection.

Trio tasks queue `WriteJob`s with `WriterThread.submit` and sleep. The thread
takes everything queued, runs it as one batch (one `BEGIN IMMEDIATE`
transaction, a SAVEPOINT per job), probes `PRAGMA data_version`, and hands the
batch back to the Trio run that queued it with `TrioToken.run_sync_soon`.
While it runs a batch, new jobs queue for the next one, so batches grow with
the load and the thread never waits for the Trio side between them.

The thread is a daemon: it sleeps on a condition variable while idle and must
never keep the interpreter from exiting when a store was not closed. The store
also registers `WriterThread.stop` with `weakref.finalize`, so a store that is
garbage-collected stops its thread, which closes the connection.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Generic, TypeVar

import trio

from kharon._errors import KharonError, StoreClosed
from kharon.stores._sqlite_queries import SQLiteTransaction

__all__ = ["PROBE", "WriteJob", "WriterThread"]

logger = logging.getLogger("kharon.store.sqlite")

T = TypeVar("T")

# Retries of a batch that still gets SQLITE_BUSY after `busy_timeout`, and the
# backoff between them in seconds: 0.05, 0.1, 0.2, ... capped at 1 s.
_BUSY_RETRIES: Final = 8
_BUSY_BACKOFF_FIRST: Final = 0.05
_BUSY_BACKOFF_MAX: Final = 1.0

_SAVEPOINT: Final = "SAVEPOINT kharon_job"
_ROLLBACK_TO_SAVEPOINT: Final = "ROLLBACK TO kharon_job"
_RELEASE_SAVEPOINT: Final = "RELEASE kharon_job"


def _probe_only(_: SQLiteTransaction) -> None:
    raise AssertionError("a probe job is never run as a write")


# The operation of a job that only requests a `PRAGMA data_version` probe. The
# thread opens no transaction for it, so a probe never takes the write lock.
PROBE: Final[Callable[[SQLiteTransaction], None]] = _probe_only


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


class WriteJob(Generic[T]):
    """One caller's write: the operation, and its outcome once the batch is over.

    `finish` runs in the Trio thread of `token` with the finished jobs of one
    batch and whether another connection committed since the last probe.
    """

    __slots__ = ("caller", "changed", "error", "finish", "operation", "result", "token", "wakes")

    def __init__(
        self,
        operation: Callable[[SQLiteTransaction], T],
        wakes: bool,
        caller: trio.lowlevel.Task,
        token: trio.lowlevel.TrioToken,
        finish: Callable[[list[WriteJob[Any]], bool], None],
    ) -> None:
        self.operation = operation
        self.wakes = wakes
        self.caller = caller
        self.token = token
        self.finish = finish
        self.result: T | None = None
        self.error: BaseException | None = None
        self.changed = False


class WriterThread:
    """The thread that runs every write, probe and the final close of one connection.

    The connection is opened with `check_same_thread=False` by the store's
    constructor, which applies the migrations on it before this thread
    starts. From then on only this thread uses it, and this thread closes it.
    """

    def __init__(self, connection: sqlite3.Connection, path: str, busy_timeout: float) -> None:
        self._connection = connection
        self._transaction = SQLiteTransaction(connection)
        self._path = path
        self._busy_timeout = busy_timeout
        self._data_version = self._read_data_version()
        self._condition = threading.Condition(threading.Lock())
        self._queue: list[WriteJob[Any]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Write transactions committed; tests use it to see batching.
        self.committed_batches = 0

    @property
    def started(self) -> bool:
        return self._thread is not None

    def submit(self, job: WriteJob[Any], *, last: bool = False) -> None:
        """Queue `job` for the next batch, starting the thread on first use.

        With `last`, the thread closes the connection after this batch and
        ends, and `job` finishes only then. Later calls raise `StoreClosed`.
        """
        with self._condition:
            if self._stopping:
                raise StoreClosed(f"the SQLite store {self._path} is closed")
            self._queue.append(job)
            if last:
                self._stopping = True
            self._condition.notify()
            # Started under the lock, so two first submits never start two threads.
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"kharon sqlite writer {self._path}", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        """Ask the thread to finish the queued jobs, close the connection and end.

        It does not wait. A thread that never started has nothing to close here.
        """
        with self._condition:
            self._stopping = True
            self._condition.notify()

    def close_unstarted(self) -> None:
        """Close the connection of a thread that never started; call it once, after `stop`."""
        if self._thread is None:
            self._connection.close()

    # -- in the thread -------------------------------------------------------

    def _run(self) -> None:
        # Each batch is handled in its own call, so no local variable keeps
        # the last batch (and through it the store) alive while the thread sleeps.
        while self._run_next_batch():
            pass

    def _run_next_batch(self) -> bool:
        """Run the queued jobs as one batch and deliver them; return False once stopped."""
        with self._condition:
            while not self._queue and not self._stopping:
                self._condition.wait()
            jobs = self._queue
            self._queue = []
            stopping = self._stopping

        # A caller whose job is not delivered would wait forever, so deliver whatever fails.
        foreign_change = True
        try:
            writes = [job for job in jobs if job.operation is not PROBE]
            if writes:
                self._run_batch(writes)
            try:
                foreign_change = self._probe_data_version()
            except sqlite3.Error as exc:
                if not writes:
                    logger.warning("checking %s for commits by other processes failed: %s", self._path, exc)
            if stopping:
                self._connection.close()
        finally:
            _deliver(jobs, foreign_change)
        return not stopping

    def _run_batch(self, jobs: list[WriteJob[Any]]) -> None:
        """Commit `jobs` in one transaction, retrying the whole batch on SQLITE_BUSY."""
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                self._commit_batch(jobs)
            except _Busy as exc:
                if attempt == _BUSY_RETRIES:
                    _fail_all(jobs, partial(self._busy_error, exc.__cause__))
                    return
                delay = min(_BUSY_BACKOFF_FIRST * 2**attempt, _BUSY_BACKOFF_MAX)
                logger.warning(
                    "%s is locked by another process: retrying a batch of %d writes in %.2f s (retry %d of %d)",
                    self._path,
                    len(jobs),
                    delay,
                    attempt + 1,
                    _BUSY_RETRIES,
                )
                time.sleep(delay)
            except sqlite3.Error as exc:
                _fail_all(jobs, partial(self._batch_error, exc))
                return
            except BaseException as exc:
                # A bug in the store itself, or a job that raised a BaseException.
                # The thread must go on serving writes, and a caller must not
                # take a rolled-back write for a result, so every caller in
                # the batch gets the error instead.
                logger.error("batch of %d writes to %s failed: %r", len(jobs), self._path, exc, exc_info=exc)
                _fail_all(jobs, partial(self._batch_error, exc))
                return
            else:
                self.committed_batches += 1
                return

    def _commit_batch(self, jobs: list[WriteJob[Any]]) -> None:
        connection = self._connection
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
            error = KharonError(f"SQLite write to {self._path} failed, this write was rolled back: {exc}")
            error.__cause__ = exc
            return error
        return exc

    def _batch_error(self, exc: BaseException) -> KharonError:
        error = KharonError(f"SQLite write to {self._path} failed, nothing was written: {exc}")
        error.__cause__ = exc
        return error

    def _busy_error(self, cause: BaseException | None) -> KharonError:
        error = KharonError(
            f"{self._path} stayed locked by another process through {_BUSY_RETRIES + 1} tries of "
            f"{self._busy_timeout} s each; nothing was written. Check for a process holding a long "
            "write transaction on this file"
        )
        error.__cause__ = cause
        return error

    def _read_data_version(self) -> int:
        return int(self._connection.execute("PRAGMA data_version").fetchone()[0])

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


def _deliver(jobs: list[WriteJob[Any]], foreign_change: bool) -> None:
    """Hand the finished jobs to the Trio run of each, in one callback per run."""
    by_token: dict[trio.lowlevel.TrioToken, list[WriteJob[Any]]] = {}
    for job in jobs:
        by_token.setdefault(job.token, []).append(job)
    for token, finished in by_token.items():
        try:
            token.run_sync_soon(finished[0].finish, finished, foreign_change)
        except trio.RunFinishedError:
            # Unreachable while callers wait for their jobs, which keeps the run alive.
            logger.error("the Trio run that queued %d writes to a SQLite store has ended", len(finished))


def _fail_all(jobs: list[WriteJob[Any]], make_error: Callable[[], BaseException]) -> None:
    # One exception object per job: each caller raises its own, in its own task.
    for job in jobs:
        job.result = None
        job.changed = False
        job.error = make_error()
