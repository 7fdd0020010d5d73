"""The store contract: one suite that every store must pass.

`tests/test_stores.py` runs `StoreContract` once per store through the
parametrized `store` fixture of `conftest.py`; a new store gets the whole suite
by being added there. Every test goes through the `Kharon` facade (lease and
expire, which the facade leaves to the workers, go straight to the store with
the same commands the workers send). After each step the projection of every
touched ticket must equal `kharon.replay` of its history, and every rejected
call must leave the log and the projection untouched.

Time moves only through `trio.sleep` under the autojump mock clock, which
moves the Kharon wall clock (`kharon.TrioClock`) by the same amount.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from kharon import (
    Event,
    EventKind,
    FixedDelay,
    InvalidTransition,
    Kharon,
    LeaseLost,
    StoreClosed,
    Ticket,
    TicketNotFound,
    TicketStatus,
    replay,
)
from kharon._commands import ExpireCommand, LeaseCommand, LeaseResult

# The default Settings lease a ticket for process_time (30 s) plus
# min(1.5 ** attempts, 15) s, so this is past any first or second lease.
PAST_LEASE = 40.0

FINISHED = ["done", "failed", "cancelled"]
SETTLE_OPERATIONS = ["retry", "done", "fail", "ack", "cancel"]


# -- helpers -------------------------------------------------------------------


async def assert_replays(kharon: Kharon, *ticket_ids: str) -> None:
    """Check that each ticket's projection equals the replay of its history."""
    for ticket_id in ticket_ids:
        history = await kharon.history(ticket_id)
        projection = await kharon.store.get(ticket_id)
        assert projection == replay(history), f"projection of {ticket_id!r} differs from replay(history)"


async def last_seq(kharon: Kharon) -> int:
    return (await kharon.stats()).last_seq


async def events_since(kharon: Kharon, seq: int) -> list[Event]:
    return await kharon.store.events(after_seq=seq)


async def assert_refused(
    kharon: Kharon, error: type[BaseException], call: Callable[[], Awaitable[Any]], *ticket_ids: str
) -> BaseException:
    """Check that `call` raises `error` and changes neither the log nor the tickets."""
    seq_before = await last_seq(kharon)
    before = {ticket_id: await kharon.store.get(ticket_id) for ticket_id in ticket_ids}

    with pytest.raises(error) as caught:
        await call()

    assert await events_since(kharon, seq_before) == []
    assert await last_seq(kharon) == seq_before
    for ticket_id in ticket_ids:
        assert await kharon.store.get(ticket_id) == before[ticket_id], f"ticket {ticket_id!r} changed"
    return caught.value


async def lease(kharon: Kharon, limit: int = 10, *, max_attempts: int | None = None) -> LeaseResult:
    """Lease as a worker's poll does, with the Kharon's settings and clock."""
    command = LeaseCommand(
        limit=limit,
        now=kharon.clock.now(),
        process_time=kharon.settings.process_time,
        backoff=kharon.settings.backoff,
        actor="test/poller",
        max_attempts=max_attempts,
    )
    return await kharon.store.lease(command)


async def expire(kharon: Kharon, limit: int = 1000) -> int:
    return await kharon.store.expire(ExpireCommand(limit=limit, now=kharon.clock.now(), actor="test/expirer"))


def new_ticket(ticket_id: str = "t-1", **fields: Any) -> Ticket:
    fields.setdefault("type", "email")
    fields.setdefault("payload", {"to": "someone@example.com"})
    return Ticket(id=ticket_id, **fields)


async def put_in_state(kharon: Kharon, state: str, ticket_id: str = "t-1") -> Ticket:
    """Put a ticket and bring it to `state` through the public operations."""
    ticket = await kharon.put(new_ticket(ticket_id))
    if state == "running":
        result = await lease(kharon)
        assert [leased.id for leased in result.tickets] == [ticket_id]
        ticket = result.tickets[0]
    elif state == "done":
        ticket = await kharon.done(ticket_id)
    elif state == "failed":
        ticket = await kharon.fail(ticket_id, error_reason="broken")
    elif state == "cancelled":
        ticket = await kharon.cancel(ticket_id, keep=True)
    assert ticket is not None
    assert ticket.status.value == state
    return ticket


def settle_call(kharon: Kharon, operation: str, ticket_id: str, **options: Any) -> Callable[[], Awaitable[Any]]:
    method = getattr(kharon, operation)
    return lambda: method(ticket_id, **options)


# -- the suite -----------------------------------------------------------------


class StoreContract:
    """Tests every store must pass; subclassed once in tests/test_stores.py."""

    # -- put -----------------------------------------------------------------

    async def test_put_new_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        seq = await last_seq(kharon)

        stored = await kharon.put(new_ticket(nice=-3))

        assert stored.status is TicketStatus.PENDING
        assert stored.attempts == 0
        assert stored.nice == -3
        assert stored.version == 1
        assert stored.runat == kharon.clock.now()
        assert stored.payload == {"to": "someone@example.com"}
        assert await kharon.get("t-1") == stored
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.PUT
        assert event.actor == "test"
        await assert_replays(kharon, "t-1")

    async def test_put_with_delay(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        stored = await kharon.put(new_ticket(), delay=timedelta(minutes=5))

        assert stored.runat == kharon.clock.now() + timedelta(minutes=5)
        await assert_replays(kharon, "t-1")

    @pytest.mark.parametrize("state", ["pending", "done", "failed", "cancelled"])
    async def test_reput_starts_new_lifecycle(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, state: str
    ) -> None:
        await kharon.put(new_ticket())
        await lease(kharon)
        await trio.sleep(PAST_LEASE)
        await lease(kharon)
        if state == "pending":
            await kharon.retry("t-1", error_reason="again")
        elif state == "done":
            await kharon.done("t-1", delay=timedelta(seconds=60), error_reason="note")
        elif state == "failed":
            await kharon.fail("t-1", error_reason="broken", delay=timedelta(seconds=60))
        else:
            await kharon.cancel("t-1", keep=True, error_reason="stop", delay=timedelta(seconds=60))
        before = await kharon.get("t-1")
        seq = await last_seq(kharon)

        stored = await kharon.put(new_ticket(payload={"round": 2}))

        assert before.attempts == 2
        assert stored.status is TicketStatus.PENDING
        assert stored.attempts == 0
        assert stored.error_reason is None
        assert stored.expires_at is None
        assert stored.payload == {"round": 2}
        assert stored.version == before.version + 1
        assert len(await events_since(kharon, seq)) == 1
        await assert_replays(kharon, "t-1")

    async def test_put_over_running_rejected(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        error = await assert_refused(kharon, InvalidTransition, lambda: kharon.put(new_ticket()), "t-1")

        assert isinstance(error, InvalidTransition)
        assert error.state == "running"
        assert error.operation == "put"
        await assert_replays(kharon, "t-1")

    async def test_reput_after_removal_continues_versions(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock
    ) -> None:
        await kharon.put(new_ticket())
        await kharon.ack("t-1")

        stored = await kharon.put(new_ticket())

        assert stored.version == 3
        history = await kharon.history("t-1")
        assert [event.version for event in history] == [1, 2, 3]
        assert [event.kind for event in history] == [EventKind.PUT, EventKind.ACK, EventKind.PUT]
        assert history[2].status_before is None
        await assert_replays(kharon, "t-1")

    async def test_put_many_stores_all(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        seq = await last_seq(kharon)

        stored = await kharon.put_many([new_ticket("a"), new_ticket("b"), new_ticket("c")])

        assert [ticket.id for ticket in stored] == ["a", "b", "c"]
        assert len(await events_since(kharon, seq)) == 3
        await assert_replays(kharon, "a", "b", "c")

    async def test_put_many_is_atomic(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running", "busy")
        await kharon.put(new_ticket("old", payload={"v": 1}))
        batch = [new_ticket("fresh"), new_ticket("old", payload={"v": 2}), new_ticket("busy")]

        await assert_refused(kharon, InvalidTransition, lambda: kharon.put_many(batch), "fresh", "old", "busy")

        assert await kharon.store.get("fresh") is None
        assert await kharon.history("fresh") == []
        assert (await kharon.get("old")).payload == {"v": 1}
        await assert_replays(kharon, "fresh", "old", "busy")

    async def test_put_many_empty(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        assert await kharon.put_many([]) == []

    async def test_put_many_bad_payload_stores_none(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock
    ) -> None:
        broken = new_ticket("b", payload={"items": []})
        broken.payload["items"].append(float("nan"))

        await assert_refused(kharon, ValueError, lambda: kharon.put_many([new_ticket("a"), broken]), "a", "b")

        assert await kharon.store.get("a") is None

    async def test_put_mutated_payload_rejected(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        ticket = new_ticket(payload={"handle": None})
        ticket.payload["handle"] = object()

        await assert_refused(kharon, ValueError, lambda: kharon.put(ticket), "t-1")

    # -- lease ---------------------------------------------------------------

    async def test_lease_due_pending(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())
        seq = await last_seq(kharon)
        now = kharon.clock.now()

        result = await lease(kharon)

        (leased,) = result.tickets
        assert leased.status is TicketStatus.RUNNING
        assert leased.attempts == 1
        # process_time 30 s + min(1.5 ** 0, 15) s
        assert leased.runat == now + timedelta(seconds=31)
        assert leased.lease_version == leased.version == 2
        assert await kharon.get("t-1") == leased
        assert result.next_due_at == leased.runat
        assert result.exhausted == []
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.LEASE
        await assert_replays(kharon, "t-1")

    async def test_lease_skips_future_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        stored = await kharon.put(new_ticket(), delay=timedelta(seconds=10))
        seq = await last_seq(kharon)

        result = await lease(kharon)

        assert result.tickets == []
        assert result.next_due_at == stored.runat
        assert await events_since(kharon, seq) == []

    async def test_lease_when_runat_reached(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket(), delay=timedelta(seconds=10))
        await trio.sleep(10)

        result = await lease(kharon)

        assert [ticket.id for ticket in result.tickets] == ["t-1"]

    async def test_full_lease_skips_next_due(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())
        await kharon.put(new_ticket("t-2"), delay=timedelta(seconds=10))

        result = await lease(kharon, limit=1)

        assert [ticket.id for ticket in result.tickets] == ["t-1"]
        assert result.next_due_at is None

    async def test_lease_empty_store(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        result = await lease(kharon)

        assert result.tickets == []
        assert result.next_due_at is None

    async def test_running_not_leased_twice(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        await trio.sleep(30)

        result = await lease(kharon)

        assert result.tickets == []

    async def test_expired_lease_leased_again(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        first = await put_in_state(kharon, "running")
        await trio.sleep(PAST_LEASE)
        now = kharon.clock.now()

        (again,) = (await lease(kharon)).tickets

        assert first.runat is not None
        assert first.runat <= now
        assert again.status is TicketStatus.RUNNING
        assert again.attempts == 2
        # process_time 30 s + min(1.5 ** 1, 15) s
        assert again.runat == now + timedelta(seconds=31.5)
        assert again.lease_version == again.version == 3
        await assert_replays(kharon, "t-1")

    async def test_lease_respects_limit(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket(f"t-{n}") for n in range(5)])

        result = await lease(kharon, limit=2)

        assert len(result.tickets) == 2
        assert len((await lease(kharon, limit=10)).tickets) == 3

    async def test_poll_order(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        """Nice beats runat, runat beats insertion order; ids sort against insertion."""
        now = kharon.clock.now()
        await kharon.put(new_ticket("nice-5-earliest", nice=5, runat=now - timedelta(seconds=10)))
        await kharon.put(new_ticket("zz-first-in", nice=0, runat=now - timedelta(seconds=1)))
        await kharon.put(new_ticket("earlier-runat", nice=0, runat=now - timedelta(seconds=2)))
        await kharon.put(new_ticket("aa-second-in", nice=0, runat=now - timedelta(seconds=1)))
        await kharon.put(new_ticket("nice-minus-1-latest", nice=-1, runat=now))

        order = [ticket.id for _ in range(5) for ticket in (await lease(kharon, limit=1)).tickets]

        assert order == ["nice-minus-1-latest", "earlier-runat", "zz-first-in", "aa-second-in", "nice-5-earliest"]

    async def test_poll_batch_in_order(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        now = kharon.clock.now()
        await kharon.put(new_ticket("c", nice=2, runat=now - timedelta(seconds=9)))
        await kharon.put(new_ticket("b", nice=1, runat=now))
        await kharon.put(new_ticket("a", nice=1, runat=now - timedelta(seconds=1)))

        result = await lease(kharon, limit=3)

        assert [ticket.id for ticket in result.tickets] == ["a", "b", "c"]

    async def test_concurrent_leases_never_share(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket(f"t-{n:02}") for n in range(20)])
        leased: list[str] = []

        async def poll() -> None:
            result = await lease(kharon, limit=3)
            leased.extend(ticket.id for ticket in result.tickets)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(poll)

        assert len(leased) == len(set(leased))
        assert sorted(leased) == [f"t-{n:02}" for n in range(20)]
        for n in range(20):
            assert (await kharon.get(f"t-{n:02}")).attempts == 1
        await assert_replays(kharon, *leased)

    async def test_max_attempts_fails_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())
        await lease(kharon, max_attempts=2)
        await trio.sleep(PAST_LEASE)
        await lease(kharon, max_attempts=2)
        await trio.sleep(PAST_LEASE)
        seq = await last_seq(kharon)

        result = await lease(kharon, max_attempts=2)

        assert result.tickets == []
        (exhausted,) = result.exhausted
        assert exhausted.status is TicketStatus.FAILED
        assert exhausted.attempts == 2
        assert "max_attempts is 2" in exhausted.error_reason
        assert await kharon.get("t-1") == exhausted
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.FAIL
        await assert_replays(kharon, "t-1")

    async def test_exhausted_ticket_frees_slot(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket("worn", nice=-1))
        await lease(kharon, max_attempts=1)
        await trio.sleep(PAST_LEASE)
        await kharon.put(new_ticket("fresh"))

        result = await lease(kharon, limit=1, max_attempts=1)

        assert [ticket.id for ticket in result.tickets] == ["fresh"]
        assert [ticket.id for ticket in result.exhausted] == ["worn"]

    # -- retry ---------------------------------------------------------------

    @pytest.mark.parametrize("state", ["pending", "running"])
    async def test_retry_with_delay(self, kharon: Kharon, autojump_clock: trio.testing.MockClock, state: str) -> None:
        before = await put_in_state(kharon, state)
        seq = await last_seq(kharon)

        retried = await kharon.retry("t-1", delay=timedelta(seconds=12), error_reason="busy")

        assert retried is not None
        assert retried.status is TicketStatus.PENDING
        assert retried.runat == kharon.clock.now() + timedelta(seconds=12)
        assert retried.attempts == before.attempts
        assert retried.error_reason == "busy"
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.RETRY
        await assert_replays(kharon, "t-1")

    async def test_retry_default_backoff(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())
        for _ in range(3):
            await lease(kharon)
            await trio.sleep(PAST_LEASE)

        retried = await kharon.retry("t-1")

        assert retried is not None
        assert retried.attempts == 3
        assert retried.runat == kharon.clock.now() + timedelta(seconds=1.5**3)

    async def test_retried_ticket_leased_when_due(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        await kharon.retry("t-1", delay=FixedDelay(5))

        early = await lease(kharon)
        await trio.sleep(5)
        late = await lease(kharon)

        assert early.tickets == []
        assert [ticket.attempts for ticket in late.tickets] == [2]

    # -- done, fail, ack, cancel ---------------------------------------------

    @pytest.mark.parametrize("state", ["pending", "running"])
    @pytest.mark.parametrize(
        ("operation", "options", "status"),
        [
            ("done", {}, TicketStatus.DONE),
            ("fail", {"error_reason": "broken"}, TicketStatus.FAILED),
            ("ack", {"keep": True}, TicketStatus.DONE),
            ("cancel", {"keep": True}, TicketStatus.CANCELLED),
        ],
    )
    async def test_settle_kept(
        self,
        kharon: Kharon,
        autojump_clock: trio.testing.MockClock,
        state: str,
        operation: str,
        options: dict[str, Any],
        status: TicketStatus,
    ) -> None:
        await put_in_state(kharon, state)
        seq = await last_seq(kharon)

        settled = await settle_call(kharon, operation, "t-1", **options)()

        assert settled is not None
        assert settled.status is status
        assert settled.expires_at is None
        assert await kharon.get("t-1") == settled
        (event,) = await events_since(kharon, seq)
        assert event.kind == operation
        await assert_replays(kharon, "t-1")

    async def test_fail_records_exception(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        failed = await kharon.fail("t-1", error_reason=ConnectionError("smtp down"))

        assert failed is not None
        assert failed.error_reason == "ConnectionError: smtp down"
        await assert_replays(kharon, "t-1")

    @pytest.mark.parametrize("state", ["pending", "running"])
    @pytest.mark.parametrize("operation", ["ack", "cancel"])
    async def test_settle_removes(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, state: str, operation: str
    ) -> None:
        await put_in_state(kharon, state)
        seq = await last_seq(kharon)

        result = await settle_call(kharon, operation, "t-1")()

        assert result is None
        assert await kharon.store.get("t-1") is None
        with pytest.raises(TicketNotFound):
            await kharon.get("t-1")
        (event,) = await events_since(kharon, seq)
        assert event.kind == operation
        assert event.status_after is None
        await assert_replays(kharon, "t-1")

    async def test_removed_cancel_keeps_reason(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        await kharon.cancel("t-1", error_reason={"by": "operator", "why": "duplicate"})

        last = (await kharon.history("t-1"))[-1]
        assert last.kind is EventKind.CANCEL
        assert last.status_after is None
        assert last.changes["error_reason"] == {"by": "operator", "why": "duplicate"}

    @pytest.mark.parametrize("state", FINISHED)
    @pytest.mark.parametrize("operation", SETTLE_OPERATIONS)
    async def test_settle_finished_rejected(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, state: str, operation: str
    ) -> None:
        await put_in_state(kharon, state)

        error = await assert_refused(kharon, InvalidTransition, settle_call(kharon, operation, "t-1"), "t-1")

        assert isinstance(error, InvalidTransition)
        assert error.state == state
        assert error.operation == operation
        assert set(error.allowed) == {"put", "expire", "delete"}
        assert "'t-1'" in str(error)

    @pytest.mark.parametrize("operation", SETTLE_OPERATIONS)
    async def test_settle_missing_ticket(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, operation: str
    ) -> None:
        error = await assert_refused(kharon, TicketNotFound, settle_call(kharon, operation, "ghost"), "ghost")

        assert isinstance(error, TicketNotFound)
        assert error.ticket_id == "ghost"
        assert isinstance(error, LookupError)

    async def test_get_missing_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        with pytest.raises(TicketNotFound, match="ghost"):
            await kharon.get("ghost")

    # -- fencing with lease= -------------------------------------------------

    async def test_stale_lease_rejected(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        await trio.sleep(PAST_LEASE)
        await lease(kharon)

        error = await assert_refused(kharon, LeaseLost, lambda: kharon.ack("t-1", lease=1), "t-1")

        assert isinstance(error, LeaseLost)
        assert error.lease == 1
        assert error.current == 2

    async def test_current_lease_accepted(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        await trio.sleep(PAST_LEASE)
        await lease(kharon)

        settled = await kharon.done("t-1", lease=2)

        assert settled is not None
        assert settled.status is TicketStatus.DONE
        await assert_replays(kharon, "t-1")

    @pytest.mark.parametrize("bad_lease", [-1, True, 1.0, "1"])
    async def test_bad_lease_rejected(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, bad_lease: object
    ) -> None:
        await put_in_state(kharon, "running")

        await assert_refused(kharon, ValueError, lambda: kharon.ack("t-1", lease=bad_lease), "t-1")  # type: ignore[arg-type]

    # -- expire --------------------------------------------------------------

    @pytest.mark.parametrize(
        ("operation", "options"),
        [
            ("done", {}),
            ("fail", {"error_reason": "broken"}),
            ("ack", {"keep": True}),
            ("cancel", {"keep": True}),
        ],
    )
    async def test_expire_after_ttl(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, operation: str, options: dict[str, Any]
    ) -> None:
        await put_in_state(kharon, "running")
        settled = await settle_call(kharon, operation, "t-1", delay=timedelta(seconds=60), **options)()
        assert settled is not None
        assert settled.expires_at == kharon.clock.now() + timedelta(seconds=60)

        await trio.sleep(59)
        early = await expire(kharon)
        await assert_replays(kharon, "t-1")
        await trio.sleep(1)
        seq = await last_seq(kharon)
        removed = await expire(kharon)

        assert early == 0
        assert removed == 1
        assert await kharon.store.get("t-1") is None
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.EXPIRE
        assert event.status_before == settled.status
        await assert_replays(kharon, "t-1")

    async def test_no_ttl_never_expires(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "done")
        await trio.sleep(10 * 365 * 86_400)

        removed = await expire(kharon)

        assert removed == 0
        assert (await kharon.get("t-1")).status is TicketStatus.DONE

    async def test_expire_leaves_active_tickets(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running", "busy")
        await put_in_state(kharon, "pending", "waiting")
        await trio.sleep(86_400)

        removed = await expire(kharon)

        assert removed == 0
        assert await kharon.store.get("waiting") is not None
        assert await kharon.store.get("busy") is not None

    async def test_expire_respects_limit(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        for n in range(5):
            await kharon.put(new_ticket(f"t-{n}"))
            await kharon.done(f"t-{n}", delay=timedelta(seconds=1))
        await trio.sleep(1)

        first = await expire(kharon, limit=3)
        second = await expire(kharon, limit=3)

        assert first == 3
        assert second == 2
        assert (await kharon.stats()).total == 0

    # -- delete --------------------------------------------------------------

    @pytest.mark.parametrize("state", ["pending", "running", "done", "failed", "cancelled"])
    async def test_delete_any_state(self, kharon: Kharon, autojump_clock: trio.testing.MockClock, state: str) -> None:
        await put_in_state(kharon, state)
        seq = await last_seq(kharon)

        deleted = await kharon.delete("t-1")

        assert deleted is True
        assert await kharon.store.get("t-1") is None
        (event,) = await events_since(kharon, seq)
        assert event.kind is EventKind.DELETE
        assert event.status_before is TicketStatus(state)
        await assert_replays(kharon, "t-1")

    async def test_delete_missing_is_noop(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        seq = await last_seq(kharon)

        deleted = await kharon.delete("ghost")

        assert deleted is False
        assert await events_since(kharon, seq) == []

    async def test_delete_twice(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())
        await kharon.delete("t-1")

        again = await kharon.delete("t-1")

        assert again is False
        assert len(await kharon.history("t-1")) == 2

    # -- reading -------------------------------------------------------------

    async def test_history_after_removal(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        await kharon.retry("t-1", delay=timedelta(seconds=0))
        await kharon.ack("t-1")

        history = await kharon.history("t-1")

        assert [event.kind for event in history] == [EventKind.PUT, EventKind.LEASE, EventKind.RETRY, EventKind.ACK]
        assert [event.version for event in history] == [1, 2, 3, 4]
        assert [event.status_after for event in history] == [
            TicketStatus.PENDING,
            TicketStatus.RUNNING,
            TicketStatus.PENDING,
            None,
        ]
        assert replay(history) is None

    async def test_history_unknown_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        assert await kharon.history("ghost") == []

    async def test_history_per_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket("a"))
        await kharon.put(new_ticket("b"))
        await kharon.done("a")

        history = await kharon.history("a")

        assert {event.ticket_id for event in history} == {"a"}
        assert len(history) == 2

    async def test_events_in_seq_order(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket("a"), new_ticket("b")])
        await lease(kharon)
        await kharon.ack("a")
        await kharon.fail("b")

        events = await kharon.store.events()

        assert [event.ticket_id for event in events] == ["a", "b", "a", "b", "a", "b"]
        assert [event.kind for event in events] == [
            EventKind.PUT,
            EventKind.PUT,
            EventKind.LEASE,
            EventKind.LEASE,
            EventKind.ACK,
            EventKind.FAIL,
        ]
        seqs = [event.seq for event in events]
        assert all(seq is not None for seq in seqs)
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert seqs[-1] == await last_seq(kharon)

    async def test_events_after_seq(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket(f"t-{n}") for n in range(6)])
        everything = await kharon.store.events()
        middle = everything[2].seq
        assert middle is not None

        after = await kharon.store.events(after_seq=middle)
        limited = await kharon.store.events(after_seq=middle, limit=2)

        assert after == everything[3:]
        assert limited == everything[3:5]
        assert await kharon.store.events(after_seq=await last_seq(kharon)) == []

    async def test_events_match_history(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running", "a")
        await put_in_state(kharon, "done", "b")

        events = await kharon.store.events()

        for ticket_id in ("a", "b"):
            assert [event for event in events if event.ticket_id == ticket_id] == await kharon.history(ticket_id)

    async def test_list_pagination(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket(f"t-{n}") for n in (3, 0, 4, 1, 2)])

        first = await kharon.store.list_tickets(limit=2)
        second = await kharon.store.list_tickets(limit=2, after_id=first[-1].id)
        third = await kharon.store.list_tickets(limit=2, after_id=second[-1].id)
        fourth = await kharon.store.list_tickets(limit=2, after_id=third[-1].id)

        assert [ticket.id for ticket in first] == ["t-0", "t-1"]
        assert [ticket.id for ticket in second] == ["t-2", "t-3"]
        assert [ticket.id for ticket in third] == ["t-4"]
        assert fourth == []

    async def test_list_filters(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many(
            [new_ticket("a", type="email"), new_ticket("b", type="sms"), new_ticket("c", type="email")]
        )
        await kharon.done("c")

        pending = await kharon.store.list_tickets(status=TicketStatus.PENDING)
        emails = await kharon.store.list_tickets(type="email")
        done_emails = await kharon.store.list_tickets(status=TicketStatus.DONE, type="email")
        nothing = await kharon.store.list_tickets(status=TicketStatus.FAILED)

        assert [ticket.id for ticket in pending] == ["a", "b"]
        assert [ticket.id for ticket in emails] == ["a", "c"]
        assert [ticket.id for ticket in done_emails] == ["c"]
        assert nothing == []
        assert await kharon.store.list_tickets(type="email") == [await kharon.get("a"), await kharon.get("c")]

    async def test_list_excludes_removed(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many([new_ticket("a"), new_ticket("b")])
        await kharon.ack("a")

        listed = await kharon.store.list_tickets()

        assert [ticket.id for ticket in listed] == ["b"]

    async def test_stats_counts(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put_many(
            [new_ticket("a", type="email"), new_ticket("b", type="sms"), new_ticket("c", type="email")]
        )
        await lease(kharon, limit=1)
        await kharon.done("b")
        await kharon.put(new_ticket("d", type="sms"))
        await kharon.ack("d")

        stats = await kharon.stats()

        assert stats.by_status == {"pending": 1, "running": 1, "done": 1, "failed": 0, "cancelled": 0}
        assert stats.by_type == {"email": {"pending": 1, "running": 1}, "sms": {"done": 1}}
        assert stats.events_by_kind == {"put": 4, "lease": 1, "done": 1, "ack": 1}
        assert stats.last_seq == 7
        assert stats.total == 3

    async def test_stats_empty_store(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        stats = await kharon.stats()

        assert stats.by_status == {"pending": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        assert stats.by_type == {}
        assert stats.last_seq == 0
        assert stats.total == 0

    async def test_returned_ticket_is_a_copy(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        stored = await kharon.put(new_ticket(payload={"items": [1]}))

        stored.payload["items"].append(2)
        fetched = await kharon.get("t-1")
        fetched.payload["items"].append(3)

        assert (await kharon.get("t-1")).payload == {"items": [1]}
        await assert_replays(kharon, "t-1")

    # -- update= -------------------------------------------------------------

    async def test_update_sync_edits_payload(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        seq = await last_seq(kharon)

        def bump(ticket: Ticket) -> None:
            ticket.payload = {**ticket.payload, "step": 2}

        retried = await kharon.retry("t-1", delay=timedelta(seconds=0), update=bump)

        assert retried is not None
        assert retried.payload == {"to": "someone@example.com", "step": 2}
        assert retried.status is TicketStatus.PENDING
        assert len(await events_since(kharon, seq)) == 1
        await assert_replays(kharon, "t-1")

    async def test_update_async_edits(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        async def edit(ticket: Ticket) -> None:
            await trio.lowlevel.checkpoint()
            ticket.nice = 7
            ticket.error_reason = {"code": 451}

        failed = await kharon.fail("t-1", update=edit)

        assert failed is not None
        assert failed.nice == 7
        assert failed.error_reason == {"code": 451}
        assert failed.status is TicketStatus.FAILED
        await assert_replays(kharon, "t-1")

    async def test_update_sees_other_options(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        seen: list[Ticket] = []

        done = await kharon.done("t-1", nice=4, delay=timedelta(seconds=60), error_reason="fine", update=seen.append)

        (preview,) = seen
        assert preview.nice == 4
        assert preview.status is TicketStatus.DONE
        assert preview.error_reason == "fine"
        assert preview.expires_at == kharon.clock.now() + timedelta(seconds=60)
        assert done == await kharon.get("t-1")

    async def test_update_on_removal(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        def note(ticket: Ticket) -> None:
            ticket.error_reason = "superseded"

        result = await kharon.cancel("t-1", update=note)

        assert result is None
        assert (await kharon.history("t-1"))[-1].changes["error_reason"] == "superseded"

    async def test_update_runat_on_retry(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        target = kharon.clock.now() + timedelta(hours=2)

        def postpone(ticket: Ticket) -> None:
            ticket.runat = target

        retried = await kharon.retry("t-1", update=postpone)

        assert retried is not None
        assert retried.runat == target
        await assert_replays(kharon, "t-1")

    @pytest.mark.parametrize(
        ("field", "value"),
        [("id", "other"), ("type", "sms"), ("status", TicketStatus.DONE), ("attempts", 9)],
    )
    async def test_update_fixed_field_rejected(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, field: str, value: object
    ) -> None:
        await put_in_state(kharon, "running")

        def change(ticket: Ticket) -> None:
            setattr(ticket, field, value)

        error = await assert_refused(kharon, ValueError, lambda: kharon.retry("t-1", update=change), "t-1", "other")

        assert field in str(error)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("payload", {"bad": float("nan")}), ("nice", 2**31), ("runat", "not a time")],
    )
    async def test_update_invalid_value_rejected(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, field: str, value: object
    ) -> None:
        await put_in_state(kharon, "running")

        def change(ticket: Ticket) -> None:
            setattr(ticket, field, value)

        await assert_refused(kharon, ValueError, lambda: kharon.retry("t-1", update=change), "t-1")

    async def test_update_in_place_nan_rejected(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        def change(ticket: Ticket) -> None:
            ticket.payload["score"] = float("inf")

        await assert_refused(kharon, ValueError, lambda: kharon.retry("t-1", update=change), "t-1")

    async def test_update_exception_propagates(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")

        def explode(ticket: Ticket) -> None:
            raise KeyError("missing")

        await assert_refused(kharon, KeyError, lambda: kharon.done("t-1", update=explode), "t-1")

    async def test_update_retried_on_conflict(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "running")
        seq = await last_seq(kharon)
        calls: list[int] = []

        async def edit(ticket: Ticket) -> None:
            calls.append(ticket.version)
            if len(calls) == 1:
                # A concurrent writer changes the ticket between the read and the write.
                await kharon.retry("t-1", delay=timedelta(seconds=0), nice=9)
            ticket.payload = {"edited": True}

        retried = await kharon.retry("t-1", delay=timedelta(seconds=0), update=edit)

        assert len(calls) == 2
        assert calls[1] == calls[0] + 1
        assert retried is not None
        assert retried.nice == 9
        assert retried.payload == {"edited": True}
        assert len(await events_since(kharon, seq)) == 2
        await assert_replays(kharon, "t-1")

    async def test_update_missing_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        calls: list[Ticket] = []

        await assert_refused(kharon, TicketNotFound, lambda: kharon.ack("ghost", update=calls.append), "ghost")

        assert calls == []

    async def test_update_invalid_transition(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await put_in_state(kharon, "done")
        calls: list[Ticket] = []

        await assert_refused(kharon, InvalidTransition, lambda: kharon.retry("t-1", update=calls.append), "t-1")

        assert calls == []

    async def test_put_update_sees_options(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        seen: list[Ticket] = []

        def edit(ticket: Ticket) -> None:
            seen.append(ticket.model_copy(deep=True))
            ticket.payload = {"edited": True}

        stored = await kharon.put(new_ticket(), delay=timedelta(seconds=30), nice=6, update=edit)

        (preview,) = seen
        assert preview.nice == 6
        assert preview.runat == kharon.clock.now() + timedelta(seconds=30)
        assert stored.payload == {"edited": True}
        assert stored.nice == 6
        await assert_replays(kharon, "t-1")

    @pytest.mark.parametrize(
        ("field", "value"),
        [("id", "other"), ("type", "sms"), ("status", TicketStatus.DONE), ("attempts", 9)],
    )
    async def test_put_update_fixed_field_rejected(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, field: str, value: object
    ) -> None:
        def change(ticket: Ticket) -> None:
            setattr(ticket, field, value)

        put = lambda: kharon.put(new_ticket(), update=change)  # noqa: E731

        error = await assert_refused(kharon, ValueError, put, "t-1", "other")

        assert field in str(error)

    # -- bad input through the facade ----------------------------------------

    @pytest.mark.parametrize(
        "options",
        [
            {"delay": timedelta(seconds=-1)},
            {"nice": 2**31},
            {"nice": -(2**31) - 1},
            {"nice": True},
        ],
        ids=["negative-delay", "nice-too-big", "nice-too-small", "nice-bool"],
    )
    async def test_put_bad_options(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, options: dict[str, Any]
    ) -> None:
        await assert_refused(kharon, ValueError, lambda: kharon.put(new_ticket(), **options), "t-1")

    @pytest.mark.parametrize(
        "options",
        [
            {"delay": timedelta(seconds=-1)},
            {"nice": 2**31},
            {"error_reason": float("nan")},
            {"error_reason": {"at": object()}},
        ],
        ids=["negative-delay", "nice-too-big", "reason-nan", "reason-object"],
    )
    async def test_settle_bad_options(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, options: dict[str, Any]
    ) -> None:
        await put_in_state(kharon, "running")

        await assert_refused(kharon, ValueError, lambda: kharon.retry("t-1", **options), "t-1")

    async def test_put_rejects_non_ticket(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await assert_refused(kharon, TypeError, lambda: kharon.put({"id": "t-1", "type": "email"}), "t-1")  # type: ignore[arg-type]

    @pytest.mark.parametrize("bad_id", ["", "x" * 256, "new\nline", "nul\x00"], ids=["empty", "long", "newline", "nul"])
    async def test_bad_id_rejected_everywhere(
        self, kharon: Kharon, autojump_clock: trio.testing.MockClock, bad_id: str
    ) -> None:
        calls = [
            lambda: kharon.get(bad_id),
            lambda: kharon.history(bad_id),
            lambda: kharon.delete(bad_id),
            lambda: kharon.ack(bad_id),
            lambda: kharon.retry(bad_id),
            lambda: kharon.cancel(bad_id),
        ]

        for call in calls:
            await assert_refused(kharon, ValueError, call)

    # -- closing -------------------------------------------------------------

    # -- waking --------------------------------------------------------------

    async def test_put_during_lease_wakes_waiter(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        """A put that commits while a poll runs must wake the poller's next wait."""
        token = kharon.store.change_token()
        async with trio.open_nursery() as nursery:
            # Started in this order, both writes reach the store before either
            # returns: the SQLite store commits them in one batch.
            nursery.start_soon(lease, kharon)
            nursery.start_soon(kharon.put, new_ticket())

        with trio.move_on_after(60) as waited:
            await kharon.store.wait_for_change(token)

        assert not waited.cancelled_caught

    async def test_wait_blocks_without_change(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        token = kharon.store.change_token()

        with trio.move_on_after(60) as waited:
            await kharon.store.wait_for_change(token)

        assert waited.cancelled_caught

    async def test_closed_store_raises(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.put(new_ticket())

        await kharon.close()

        with pytest.raises(StoreClosed):
            await kharon.put(new_ticket("b"))
        with pytest.raises(StoreClosed):
            await kharon.get("t-1")
        with pytest.raises(StoreClosed):
            await kharon.ack("t-1")
        with pytest.raises(StoreClosed):
            await kharon.history("t-1")
        with pytest.raises(StoreClosed):
            await lease(kharon)
        with pytest.raises(StoreClosed):
            await kharon.stats()
        with pytest.raises(StoreClosed):
            await kharon.delete("t-1")
        with pytest.raises(StoreClosed):
            await expire(kharon)

    async def test_close_twice_is_harmless(self, kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
        await kharon.close()

        await kharon.close()

        with pytest.raises(StoreClosed):
            await kharon.get("t-1")
