"""Differential test: random operations on every store against a plain model.

`LifecycleMachine` applies the same random operations (put, lease, retry,
done, fail, ack, cancel, expire, delete, settle with a stale lease, and time
passing) to a `Kharon` on each store and to `Model`. The model is a dict-based
implementation of the lifecycle table, written here without any Kharon code.
After every step it checks that each store agrees with the model (existence,
status, attempts, runat, expiry, which calls raise, how many events were
appended) and that every ticket's projection equals the replay of its history.

How Trio and Hypothesis fit together: Hypothesis drives a synchronous state
machine, so each rule and each invariant runs its async part with its own
`trio.run`. Both stores are built to be used by successive runs (the SQLite
store starts its writer task lazily in each run). Time is a `ManualClock`
that only the `advance` rule moves, because a Trio clock restarts with every
run. The examples are derandomized and no example database is kept, so every
run, in CI too, executes the same operations.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import skip_store
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from kharon import (
    BackoffDelay,
    FixedDelay,
    InvalidTransition,
    Kharon,
    LeaseLost,
    Settings,
    Ticket,
    TicketNotFound,
    replay,
)
from kharon._commands import ExpireCommand, LeaseCommand
from kharon.stores import MemoryStore, Store

TICKET_IDS = ["a", "b", "c"]
PROCESS_TIME = timedelta(seconds=30)
BACKOFF_BASE = 2.0
MAX_BACKOFF = 15.0
MAX_ATTEMPTS = 3
START = datetime(2030, 1, 1, tzinfo=UTC)

ids = st.sampled_from(TICKET_IDS)
delays = st.sampled_from([None, 0, 5, 40])
nices = st.sampled_from([-1, 0, 1])


class ManualClock:
    """A wall clock that moves only when `advance` is called."""

    def __init__(self) -> None:
        self.current = START

    def now(self) -> datetime:
        return self.current


# -- the model -----------------------------------------------------------------


@dataclass
class ModelTicket:
    status: str
    attempts: int
    nice: int
    runat: datetime
    inserted: int
    expires_at: datetime | None = None


@dataclass
class Model:
    """The lifecycle table as plain Python: what each operation should do."""

    clock: ManualClock
    tickets: dict[str, ModelTicket] = field(default_factory=dict)
    events: int = 0
    insertions: itertools.count[int] = field(default_factory=itertools.count)

    def put(self, ticket_id: str, nice: int, delay: int | None) -> type[Exception] | None:
        current = self.tickets.get(ticket_id)
        if current is not None and current.status == "running":
            return InvalidTransition
        now = self.clock.now()
        runat = now + timedelta(seconds=delay or 0)
        self.tickets[ticket_id] = ModelTicket("pending", 0, nice, runat, next(self.insertions))
        self.events += 1
        return None

    def lease(self, limit: int) -> tuple[list[str], list[str]]:
        now = self.clock.now()
        due = [
            (ticket.nice, ticket.runat, ticket.inserted, ticket_id)
            for ticket_id, ticket in self.tickets.items()
            if ticket.status in ("pending", "running") and ticket.runat <= now
        ]
        leased: list[str] = []
        exhausted: list[str] = []
        for *_, ticket_id in sorted(due):
            if len(leased) == limit:
                break
            ticket = self.tickets[ticket_id]
            if ticket.attempts >= MAX_ATTEMPTS:
                ticket.status = "failed"
                ticket.expires_at = None
                exhausted.append(ticket_id)
            else:
                backoff = timedelta(seconds=min(BACKOFF_BASE**ticket.attempts, MAX_BACKOFF))
                ticket.status = "running"
                ticket.runat = now + PROCESS_TIME + backoff
                ticket.attempts += 1
                leased.append(ticket_id)
            self.events += 1
        return leased, exhausted

    def settle(self, ticket_id: str, operation: str, keep: bool, delay: int | None) -> type[Exception] | None:
        ticket = self.tickets.get(ticket_id)
        if ticket is None:
            return TicketNotFound
        if ticket.status not in ("pending", "running"):
            return InvalidTransition
        now = self.clock.now()
        self.events += 1
        if operation == "retry":
            seconds = min(BACKOFF_BASE**ticket.attempts, MAX_BACKOFF) if delay is None else delay
            ticket.status = "pending"
            ticket.runat = now + timedelta(seconds=seconds)
            return None
        if operation in ("ack", "cancel") and not keep:
            del self.tickets[ticket_id]
            return None
        ticket.status = {"done": "done", "fail": "failed", "ack": "done", "cancel": "cancelled"}[operation]
        ticket.expires_at = None if delay is None else now + timedelta(seconds=delay)
        return None

    def settle_stale(self, ticket_id: str) -> type[Exception]:
        return LeaseLost if ticket_id in self.tickets else TicketNotFound

    def expire(self) -> int:
        now = self.clock.now()
        expired = [
            ticket_id
            for ticket_id, ticket in self.tickets.items()
            if ticket.status in ("done", "failed", "cancelled")
            and ticket.expires_at is not None
            and ticket.expires_at <= now
        ]
        for ticket_id in expired:
            del self.tickets[ticket_id]
        self.events += len(expired)
        return len(expired)

    def delete(self, ticket_id: str) -> bool:
        if self.tickets.pop(ticket_id, None) is None:
            return False
        self.events += 1
        return True


# -- the machine ---------------------------------------------------------------


async def outcome(call: Awaitable[Any]) -> tuple[str, Any]:
    """Return ("ok", result) or ("raised", exception class) for comparison with the model."""
    try:
        return "ok", await call
    except (InvalidTransition, LeaseLost, TicketNotFound) as exc:
        return "raised", type(exc)


class LifecycleMachine(RuleBasedStateMachine):
    """Apply each rule to a Kharon and to the model; a subclass per store sets `make_store`."""

    make_store: Callable[[], Store]

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.model = Model(self.clock)
        kharon_settings = Settings(process_time=PROCESS_TIME, backoff_base=BACKOFF_BASE, max_backoff_delay=MAX_BACKOFF)
        self.kharon = Kharon(self.make_store(), kharon_settings, clock=self.clock, actor="machine")

    def run(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        return trio.run(operation)

    def teardown(self) -> None:
        trio.run(self.kharon.close)

    @initialize()
    def start_clean(self) -> None:
        assert self.run(self.kharon.stats).total == 0

    # -- rules ---------------------------------------------------------------

    @rule(ticket_id=ids, nice=nices, delay=delays)
    def put(self, ticket_id: str, nice: int, delay: int | None) -> None:
        ticket = Ticket(id=ticket_id, type="job", payload={"n": 1}, nice=nice)
        put_delay = None if delay is None else timedelta(seconds=delay)

        result = self.run(lambda: outcome(self.kharon.put(ticket, delay=put_delay)))

        expected = self.model.put(ticket_id, nice, delay)
        self.check_outcome(result, expected)

    @rule(limit=st.integers(min_value=1, max_value=3))
    def lease(self, limit: int) -> None:
        command = LeaseCommand(
            limit=limit,
            now=self.clock.now(),
            process_time=PROCESS_TIME,
            backoff=BackoffDelay(BACKOFF_BASE, MAX_BACKOFF),
            actor="machine/poller",
            max_attempts=MAX_ATTEMPTS,
        )

        result = self.run(lambda: self.kharon.store.lease(command))

        leased, exhausted = self.model.lease(limit)
        assert [ticket.id for ticket in result.tickets] == leased
        assert [ticket.id for ticket in result.exhausted] == exhausted

    @rule(limit=st.integers(min_value=1, max_value=3))
    def lease_after_expiry(self, limit: int) -> None:
        """Let every lease expire, then lease: reaches max_attempts in few steps."""
        self.advance(60)

        self.lease(limit)

    @rule(
        ticket_id=ids,
        operation=st.sampled_from(["retry", "done", "fail", "ack", "cancel"]),
        keep=st.booleans(),
        delay=delays,
    )
    def settle(self, ticket_id: str, operation: str, keep: bool, delay: int | None) -> None:
        options: dict[str, Any] = {}
        if delay is not None:
            options["delay"] = FixedDelay(delay)
        if operation in ("ack", "cancel"):
            options["keep"] = keep
        method = getattr(self.kharon, operation)

        result = self.run(lambda: outcome(method(ticket_id, **options)))

        expected = self.model.settle(ticket_id, operation, keep, delay)
        self.check_outcome(result, expected)

    @rule(ticket_id=ids, operation=st.sampled_from(["retry", "done", "fail", "ack", "cancel"]))
    def settle_stale_lease(self, ticket_id: str, operation: str) -> None:
        current = self.model.tickets.get(ticket_id)
        stale = current.attempts + 1 if current is not None else 0
        method = getattr(self.kharon, operation)

        result = self.run(lambda: outcome(method(ticket_id, lease=stale)))

        assert result == ("raised", self.model.settle_stale(ticket_id))

    @rule()
    def expire(self) -> None:
        command = ExpireCommand(limit=1000, now=self.clock.now(), actor="machine/expirer")

        removed = self.run(lambda: self.kharon.store.expire(command))

        assert removed == self.model.expire()

    @rule(ticket_id=ids)
    def delete(self, ticket_id: str) -> None:
        deleted = self.run(lambda: self.kharon.delete(ticket_id))

        assert deleted == self.model.delete(ticket_id)

    @rule(seconds=st.sampled_from([1, 5, 31, 40, 120]))
    def advance(self, seconds: int) -> None:
        self.clock.current += timedelta(seconds=seconds)

    # -- checks --------------------------------------------------------------

    def check_outcome(self, result: tuple[str, Any], expected: type[Exception] | None) -> None:
        kind, value = result
        if expected is None:
            assert kind == "ok", f"expected success, the store raised {value.__name__}"
        else:
            assert (kind, value) == ("raised", expected)

    @invariant()
    def store_matches_model(self) -> None:
        async def read() -> tuple[dict[str, Any], dict[str, Any], int]:
            projections = {ticket_id: await self.kharon.store.get(ticket_id) for ticket_id in TICKET_IDS}
            histories = {ticket_id: await self.kharon.history(ticket_id) for ticket_id in TICKET_IDS}
            events = await self.kharon.store.events(limit=1_000_000)
            return projections, histories, len(events)

        projections, histories, event_count = self.run(read)

        assert event_count == self.model.events
        for ticket_id in TICKET_IDS:
            stored = projections[ticket_id]
            expected = self.model.tickets.get(ticket_id)
            assert stored == replay(histories[ticket_id]), f"{ticket_id}: projection differs from replay"
            if expected is None:
                assert stored is None, f"{ticket_id}: the store has a ticket the model removed"
                continue
            assert stored is not None, f"{ticket_id}: the store lost a ticket"
            assert stored.status.value == expected.status, ticket_id
            assert stored.attempts == expected.attempts, ticket_id
            assert stored.nice == expected.nice, ticket_id
            assert stored.runat == expected.runat, ticket_id
            assert stored.expires_at == expected.expires_at, ticket_id


MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def sqlite_store_maker(directory: Path) -> Callable[[], Store]:
    try:
        from kharon.stores import SQLiteStore  # type: ignore[attr-defined]
    except ImportError as exc:
        skip_store(f"SQLiteStore is not available: {exc}", required_in_ci=True)
        raise
    counter = itertools.count()
    return lambda: SQLiteStore(directory / f"example-{next(counter)}.db")


@pytest.mark.parametrize("store_name", ["memory", "sqlite"])
def test_store_agrees_with_model(store_name: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="kharon-machine-"))
    try:
        make_store = MemoryStore if store_name == "memory" else sqlite_store_maker(directory)

        class Machine(LifecycleMachine):
            pass

        Machine.make_store = staticmethod(make_store)  # type: ignore[assignment]

        run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
