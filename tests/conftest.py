"""Fixtures shared by the test modules: every store, and a Kharon on the mock clock.

`store` is parametrized over every store, so each test that requests it runs
once per store. A store that cannot be built here is skipped with the reason.
When the `CI` environment variable is set, a skipped store is an error
instead, so CI cannot pass without running the whole contract.

A store is a parameter only once the package has it: `postgres` joins when
`kharon.stores.PostgresStore` exists, and then needs `KHARON_TEST_POSTGRES_DSN`
(an error in CI when unset).
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kharon import Kharon, Settings, TrioClock
from kharon.stores import MemoryStore, Store
from kharon.stores import _sqlite as sqlite_module

POSTGRES_DSN_VARIABLE = "KHARON_TEST_POSTGRES_DSN"

StoreFactory = Callable[[], Store]


def skip_store(reason: str, *, required_in_ci: bool) -> None:
    """Skip the test, or fail it when CI must run this store."""
    if required_in_ci and os.environ.get("CI"):
        pytest.fail(f"{reason}; CI runs the store contract on every store, so this is an error", pytrace=False)
    pytest.skip(reason)


def sqlite_factory(path: Path) -> StoreFactory:
    try:
        from kharon.stores import SQLiteStore  # type: ignore[attr-defined]
    except ImportError as exc:
        skip_store(f"SQLiteStore is not available: {exc}", required_in_ci=True)
        raise  # unreachable: skip_store raises
    return lambda: SQLiteStore(path / "kharon.db")


def postgres_factory() -> StoreFactory:
    from kharon.stores import PostgresStore  # type: ignore[attr-defined]

    dsn = os.environ.get(POSTGRES_DSN_VARIABLE)
    if not dsn:
        skip_store(
            f"{POSTGRES_DSN_VARIABLE} is not set; set it to the DSN of an empty PostgreSQL database "
            "to run the store contract on PostgreSQL",
            required_in_ci=True,
        )
    # TODO: the tests assume an empty database; give each test its own schema
    # or truncate the tables here when PostgresStore lands.
    return lambda: PostgresStore(dsn)


def store_names() -> list[Any]:
    import kharon.stores

    names: list[Any] = ["memory", "sqlite"]
    if hasattr(kharon.stores, "PostgresStore"):
        names.append(pytest.param("postgres", marks=pytest.mark.postgres))
    return names


@pytest.fixture(params=store_names())
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Return a function that opens the parametrized store; every call opens the same database."""
    if request.param == "memory":
        return MemoryStore
    if request.param == "sqlite":
        return sqlite_factory(tmp_path)
    return postgres_factory()


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[Store]:
    async with store_factory() as opened:
        yield opened


@pytest.fixture
def autojump_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Return a MockClock that autojumps only while no task waits for a thread.

    This replaces pytest-trio's fixture of the same name. Its plain autojump
    clock jumps as soon as every task is blocked, and a task waiting for a
    thread counts as blocked. The SQLite store runs every query in a thread:
    reads through `trio.to_thread.run_sync`, writes and probes in its writer
    thread. So the clock would jump to the next deadline (a lease expiry, a
    `fail_after`) while a query runs. Here each of those waits turns autojump
    off until the last one returns.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    threads_running = 0

    def pausing_autojump(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(original)
        async def wait_pausing_autojump(*args: Any, **kwargs: Any) -> Any:
            nonlocal threads_running
            threads_running += 1
            clock.autojump_threshold = math.inf
            try:
                return await original(*args, **kwargs)
            finally:
                threads_running -= 1
                if threads_running == 0:
                    clock.autojump_threshold = 0

        return wait_pausing_autojump

    monkeypatch.setattr(trio.to_thread, "run_sync", pausing_autojump(trio.to_thread.run_sync))
    monkeypatch.setattr(
        sqlite_module, "_wait_for_writer_thread", pausing_autojump(sqlite_module._wait_for_writer_thread)
    )
    return clock


def require_mock_clock() -> None:
    if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        raise RuntimeError(
            "this fixture moves time with the mock clock: add the autojump_clock fixture to the test's arguments"
        )


def make_kharon(store: Store, settings: Settings | None = None, *, actor: str = "test") -> Kharon:
    """Return a Kharon whose wall clock moves with Trio's (mock) clock."""
    require_mock_clock()
    return Kharon(store, settings, clock=TrioClock(), actor=actor, rng=random.Random(1234))


@pytest.fixture
async def kharon(store: Store) -> Kharon:
    """A Kharon on the parametrized store; the test must also request `autojump_clock`."""
    return make_kharon(store)
