"""Tests of the Trio runtime behind `Kharon.run`, on every store.

Every test runs under the autojump mock clock, with `kharon.TrioClock` as the
Kharon clock: sleeps, lease expiries, backoff delays and TTLs take no real
time, and instants are read from `trio.current_time()`. Handlers report
through `trio.Event`s and lists, and every wait is bounded by `fail_after`
(in mock seconds), so a broken runtime fails the test instead of hanging it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pydantic
import pytest
import trio
import trio.testing
from conftest import make_kharon
from store_contract import assert_replays

from kharon import (
    EventKind,
    Kharon,
    LeaseLost,
    Router,
    Settings,
    Ticket,
    TicketNotFound,
    TicketStatus,
    current_delivery,
)
from kharon.stores import Store

# Long enough for every test below, in mock seconds.
DEADLINE = 600


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "workers": 2,
        "process_time": 5,
        "backoff_base": 1.5,
        "max_backoff_delay": 15,
        "max_poll_interval": 15,
        "min_poll_interval": 0.01,
        "expiration_interval": 0.1,
        "shutdown_grace_period": 10,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(kharon: Kharon, router: Router) -> AsyncIterator[trio.CancelScope]:
    """Run the workers for the body of the block, then stop them and wait for the shutdown."""
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            yield nursery.cancel_scope
            nursery.cancel_scope.cancel()


async def wait_until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Check `condition` every 10 mock milliseconds until it holds."""
    # The condition is a store query, so there is no event to wait on.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


async def is_removed(kharon: Kharon, ticket_id: str) -> bool:
    return await kharon.store.get(ticket_id) is None


async def status_of(kharon: Kharon, ticket_id: str) -> TicketStatus | None:
    ticket = await kharon.store.get(ticket_id)
    return None if ticket is None else ticket.status


def email(ticket_id: str = "t-1", **fields: Any) -> Ticket:
    return Ticket(id=ticket_id, type="email", payload=fields.pop("payload", {"to": "a@example.com"}), **fields)


async def kinds(kharon: Kharon, ticket_id: str) -> list[EventKind]:
    return [event.kind for event in await kharon.history(ticket_id)]


# -- handler outcomes ----------------------------------------------------------


async def test_handler_ack_removes(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    handled = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        await kharon.ack(ticket.id)
        handled.set()

    async with running(kharon, router):
        await kharon.put(email())
        await handled.wait()

    with pytest.raises(TicketNotFound):
        await kharon.get("t-1")
    history = await kharon.history("t-1")
    assert [event.kind for event in history] == [EventKind.PUT, EventKind.LEASE, EventKind.ACK]
    assert history[2].actor is not None
    assert history[2].actor.startswith("test/worker-")
    await assert_replays(kharon, "t-1")


async def test_handler_sees_delivery(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(process_time=20))
    router = Router()
    seen: list[tuple[Any, float, int]] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        seen.append((current_delivery(), trio.current_effective_deadline() - trio.current_time(), ticket.attempts))
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: is_removed(kharon, "t-1"))

    ((delivery, deadline_left, attempts),) = seen
    assert delivery is not None
    assert delivery.ticket_id == "t-1"
    assert delivery.attempts == 1
    assert delivery.lease_version == 2
    assert attempts == 1
    # The handler's deadline is the lease expiry: process_time 20 s + 1.5 ** 0 s.
    assert deadline_left == pytest.approx(21, abs=0.01)
    assert current_delivery() is None


async def test_handler_raising_retries(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    calls: list[float] = []
    after_failure: list[Ticket] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        calls.append(trio.current_time())
        if len(calls) == 1:
            raise ValueError("smtp refused")
        after_failure.append(await kharon.get(ticket.id))
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: is_removed(kharon, "t-1"))

    assert len(calls) == 2
    # Default backoff after one delivery: min(1.5 ** 1, 15) s, plus up to two 0.01 s poll intervals.
    assert 1.5 <= calls[1] - calls[0] <= 1.5 + 0.02
    (ticket,) = after_failure
    assert ticket.error_reason == "ValueError: smtp refused"
    assert ticket.attempts == 2
    assert await kinds(kharon, "t-1") == [
        EventKind.PUT,
        EventKind.LEASE,
        EventKind.RETRY,
        EventKind.LEASE,
        EventKind.ACK,
    ]


async def test_failing_handler_spares_others(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=2))
    router = Router()
    sent: list[str] = []

    @router.route("broken")
    async def explode(ticket: Ticket) -> None:
        raise RuntimeError("always broken")

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        sent.append(ticket.id)
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put(Ticket(id="bad", type="broken"))
        for n in range(5):
            await kharon.put(email(f"good-{n}"))
        await trio.sleep(30)

    assert sorted(sent) == [f"good-{n}" for n in range(5)]
    bad = await kharon.get("bad")
    assert bad.status is TicketStatus.PENDING
    assert bad.attempts > 3
    assert bad.error_reason == "RuntimeError: always broken"
    await assert_replays(kharon, "bad", *sent)


async def test_unsettled_returns_after_lease(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(process_time=5))
    router = Router()
    calls: list[tuple[float, int]] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        calls.append((trio.current_time(), ticket.attempts))
        if len(calls) == 2:
            await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: is_removed(kharon, "t-1"))

    (first, first_attempts), (second, second_attempts) = calls
    assert first_attempts == 1
    assert second_attempts == 2
    # The first lease lasts process_time 5 s + 1.5 ** 0 s.
    assert 6 <= second - first <= 6 + 0.02
    assert await kinds(kharon, "t-1") == [EventKind.PUT, EventKind.LEASE, EventKind.LEASE, EventKind.ACK]


async def test_lease_expiry_cancels_handler(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(process_time=5))
    router = Router()
    cancelled_at: list[float] = []
    started_at: list[float] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        started_at.append(trio.current_time())
        if len(started_at) == 2:
            await kharon.ack(ticket.id)
            return
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled_at.append(trio.current_time())
            raise

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: is_removed(kharon, "t-1"))

    assert cancelled_at[0] - started_at[0] == pytest.approx(6, abs=0.01)
    history = await kharon.history("t-1")
    assert [event.kind for event in history] == [
        EventKind.PUT,
        EventKind.LEASE,
        EventKind.RETRY,
        EventKind.LEASE,
        EventKind.ACK,
    ]
    assert "did not finish before its lease expired" in history[2].changes["error_reason"]


# -- routing -------------------------------------------------------------------


async def test_unknown_type_fails(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())

    async with running(kharon, Router()):
        await kharon.put(Ticket(id="t-1", type="fax"))
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.FAILED))

    failed = await kharon.get("t-1")
    assert failed.attempts == 1
    assert "fax" in failed.error_reason
    assert "no handler" in failed.error_reason
    await assert_replays(kharon, "t-1")


async def test_not_found_handler_used(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    unrouted: list[str] = []

    @router.not_found
    async def fallback(ticket: Ticket) -> None:
        unrouted.append(ticket.type)
        await kharon.cancel(ticket.id, keep=True, error_reason="unknown type")

    async with running(kharon, router):
        await kharon.put(Ticket(id="t-1", type="fax"))
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.CANCELLED))

    assert unrouted == ["fax"]


async def test_routes_by_type(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    seen: list[tuple[str, str]] = []

    @router.route("email")
    async def send_email(ticket: Ticket) -> None:
        seen.append(("email", ticket.id))
        await kharon.ack(ticket.id)

    @router.route("sms")
    async def send_sms(ticket: Ticket) -> None:
        seen.append(("sms", ticket.id))
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put_many([email("e"), Ticket(id="s", type="sms")])
        await wait_until(lambda: _all_removed(kharon, "e", "s"))

    assert sorted(seen) == [("email", "e"), ("sms", "s")]


class Message(pydantic.BaseModel):
    to: str
    retries: int = 0


async def test_payload_model_passed(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    payloads: list[Message] = []

    @router.route("email", payload=Message)
    async def send(ticket: Ticket, payload: Message) -> None:
        payloads.append(payload)
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await kharon.put(email(payload=Message(to="b@example.com", retries=2)))
        await wait_until(lambda: is_removed(kharon, "t-1"))

    assert payloads == [Message(to="b@example.com", retries=2)]


async def test_invalid_payload_fails_ticket(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())
    router = Router()
    called: list[Ticket] = []

    @router.route("email", payload=Message)
    async def send(ticket: Ticket, payload: Message) -> None:
        called.append(ticket)

    async with running(kharon, router):
        await kharon.put(email(payload={"to": 5, "retries": "many"}))
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.FAILED))

    assert called == []
    reason = (await kharon.get("t-1")).error_reason
    assert "Message" in reason["error"]
    assert {tuple(detail["loc"]) for detail in reason["details"]} == {("to",), ("retries",)}
    await assert_replays(kharon, "t-1")


# -- fencing -------------------------------------------------------------------


async def test_stale_handler_loses_lease(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    """A handler that overruns its lease cannot settle after another worker leased the ticket."""
    kharon = make_kharon(store, settings(workers=2, process_time=5))
    router = Router()
    stale_errors: list[LeaseLost] = []
    second_started = trio.Event()
    stale_finished = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        if ticket.attempts == 1:
            # Ignore the lease deadline, as a handler blocked in a thread would.
            with trio.CancelScope(shield=True):
                await second_started.wait()
                try:
                    await kharon.ack(ticket.id)
                except LeaseLost as exc:
                    stale_errors.append(exc)
                stale_finished.set()
            return
        second_started.set()
        await stale_finished.wait()
        await kharon.done(ticket.id)

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.DONE))

    (error,) = stale_errors
    assert error.lease == 1
    assert error.current == 2
    history = await kharon.history("t-1")
    assert [event.kind for event in history] == [EventKind.PUT, EventKind.LEASE, EventKind.LEASE, EventKind.DONE]
    assert history[1].actor != history[3].actor
    assert (await kharon.get("t-1")).attempts == 2
    await assert_replays(kharon, "t-1")


async def test_retry_logged_with_reason(
    store: Store, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    kharon = make_kharon(store, settings())
    await kharon.put(email())

    await kharon.retry("t-1", error_reason="smtp timeout")

    (record,) = [r for r in caplog.records if r.name == "kharon.tickets"]
    assert record.levelname == "WARNING"
    assert "ticket t-1 retried" in record.getMessage()
    assert "smtp timeout" in record.getMessage()


async def test_stale_timeout_retry_fenced(
    store: Store, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The runtime's own retry after a timed-out handler is fenced as well."""
    kharon = make_kharon(store, settings(workers=2, process_time=5))
    router = Router()
    second_started = trio.Event()
    stale_finished = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        if ticket.attempts == 1:
            with trio.CancelScope(shield=True):
                await second_started.wait()
            stale_finished.set()
            await trio.lowlevel.checkpoint()
            return
        second_started.set()
        await stale_finished.wait()
        await trio.sleep(1)
        await kharon.done(ticket.id)

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.DONE))

    assert await kinds(kharon, "t-1") == [EventKind.PUT, EventKind.LEASE, EventKind.LEASE, EventKind.DONE]
    lost = [record for record in caplog.records if record.getMessage().startswith("lease lost")]
    assert len(lost) == 1
    assert lost[0].name == "kharon.tickets"
    assert "'retry' of ticket 't-1' rejected" in lost[0].getMessage()


# -- shutdown ------------------------------------------------------------------


async def test_shutdown_grace_period(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=3, process_time=60, shutdown_grace_period=10))
    router = Router()
    started: dict[str, trio.Event] = {name: trio.Event() for name in ("quick", "slow", "stuck")}
    stuck_cancelled: list[float] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        started[ticket.id].set()
        if ticket.id == "quick":
            await kharon.ack(ticket.id)
        elif ticket.id == "slow":
            await trio.sleep(5)
            await kharon.done(ticket.id)
        else:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                stuck_cancelled.append(trio.current_time())
                raise

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await kharon.put_many([email("quick"), email("slow"), email("stuck")])
            for event in started.values():
                await event.wait()
            stop_at = trio.current_time()
            nursery.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()
        stopped_at = trio.current_time()

    assert stopped_at - stop_at == pytest.approx(10, abs=0.01)
    assert stuck_cancelled[0] == pytest.approx(stop_at + 10, abs=0.01)
    assert await kinds(kharon, "quick") == [EventKind.PUT, EventKind.LEASE, EventKind.ACK]
    assert (await kharon.get("slow")).status is TicketStatus.DONE
    stuck = await kharon.get("stuck")
    assert stuck.status is TicketStatus.PENDING
    assert stuck.attempts == 1
    assert stuck.runat == kharon.clock.now()
    assert "shut down" in stuck.error_reason
    await assert_replays(kharon, "quick", "slow", "stuck")


async def test_shutdown_stops_polling(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=2, process_time=60, shutdown_grace_period=10))
    router = Router()
    started = trio.Event()
    handled: list[str] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        handled.append(ticket.id)
        started.set()
        await trio.sleep(5)
        await kharon.ack(ticket.id)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await kharon.put(email("first"))
            await started.wait()
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await kharon.put(email("late"))

    assert handled == ["first"]
    assert await kharon.store.get("first") is None
    late = await kharon.get("late")
    assert late.status is TicketStatus.PENDING
    assert late.attempts == 0


async def test_cancel_handlers_cuts_grace_short(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=1, process_time=600, shutdown_grace_period=300))
    router = Router()
    started = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await kharon.put(email("stuck"))
            await started.wait()
            stopped_at = trio.current_time()
            nursery.cancel_scope.cancel()
            kharon.cancel_handlers()

    assert trio.current_time() - stopped_at < 1
    stuck = await kharon.get("stuck")
    assert stuck.status is TicketStatus.PENDING
    assert stuck.error_reason == "worker shut down before the handler finished"


async def test_cancel_handlers_alone_stops_run(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=1, process_time=600, shutdown_grace_period=300))
    router = Router()
    started = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await kharon.put(email("stuck"))
            await started.wait()
            kharon.cancel_handlers()

    stuck = await kharon.get("stuck")
    assert stuck.status is TicketStatus.PENDING
    assert stuck.attempts == 1


async def test_handler_nursery_released_on_shutdown(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=1, process_time=600, shutdown_grace_period=5))
    router = Router()
    started = trio.Event()

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        started.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 100)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await kharon.put(email("nested"))
            await started.wait()
            nursery.cancel_scope.cancel()

    nested = await kharon.get("nested")
    assert nested.status is TicketStatus.PENDING
    assert nested.error_reason == "worker shut down before the handler finished"


async def test_idle_shutdown_is_immediate(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings())

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, Router())
            await trio.sleep(3)
            stop_at = trio.current_time()
            nursery.cancel_scope.cancel()

    assert trio.current_time() == pytest.approx(stop_at, abs=0.01)


# -- expiration, max_attempts, order, wake-up ----------------------------------


async def test_expirer_removes_after_ttl(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(expiration_interval=0.1))
    router = Router()
    done_at: list[float] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        await kharon.done(ticket.id, delay=timedelta(seconds=5))
        done_at.append(trio.current_time())

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.DONE))
        await trio.sleep(4.5)
        kept = await kharon.store.get("t-1")
        await wait_until(lambda: is_removed(kharon, "t-1"))
        removed_at = trio.current_time()

    assert kept is not None
    assert 5 <= removed_at - done_at[0] <= 5 + 0.1 + 0.02
    last = (await kharon.history("t-1"))[-1]
    assert last.kind is EventKind.EXPIRE
    assert last.actor == "test/expirer"


async def test_expiration_can_be_disabled(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(enable_expiration=False))
    await kharon.put(email())
    await kharon.done("t-1", delay=timedelta(seconds=1))

    async with running(kharon, Router()):
        await trio.sleep(10)

    assert (await kharon.get("t-1")).status is TicketStatus.DONE


async def test_max_attempts_gives_up(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(max_attempts=3))
    router = Router()
    calls: list[int] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        calls.append(ticket.attempts)
        raise ConnectionError("still down")

    async with running(kharon, router):
        await kharon.put(email())
        await wait_until(lambda: _has_status(kharon, "t-1", TicketStatus.FAILED))
        await trio.sleep(60)

    assert calls == [1, 2, 3]
    failed = await kharon.get("t-1")
    assert failed.attempts == 3
    assert "max_attempts is 3" in failed.error_reason
    assert (await kharon.history("t-1"))[-1].kind is EventKind.FAIL
    await assert_replays(kharon, "t-1")


async def test_one_worker_poll_order(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=1, batch_size=5))
    router = Router()
    order: list[str] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        order.append(ticket.id)
        await kharon.ack(ticket.id)

    now = kharon.clock.now()
    await kharon.put(email("nice-5-earliest", nice=5, runat=now - timedelta(seconds=10)))
    await kharon.put(email("zz-first-in", runat=now - timedelta(seconds=1)))
    await kharon.put(email("earlier-runat", runat=now - timedelta(seconds=2)))
    await kharon.put(email("aa-second-in", runat=now - timedelta(seconds=1)))
    await kharon.put(email("nice-minus-1-latest", nice=-1, runat=now))

    async with running(kharon, router):
        await wait_until(lambda: _total_is(kharon, 0))

    assert order == ["nice-minus-1-latest", "earlier-runat", "zz-first-in", "aa-second-in", "nice-5-earliest"]


async def test_put_wakes_idle_poller(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(max_poll_interval=15, min_poll_interval=0.01))
    router = Router()
    handled_at: list[float] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        handled_at.append(trio.current_time())
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        await trio.sleep(1)
        put_at = trio.current_time()
        await kharon.put(email())
        await wait_until(lambda: is_removed(kharon, "t-1"))

    assert handled_at[0] - put_at < 0.1


async def test_delayed_ticket_runs_on_time(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(max_poll_interval=15))
    router = Router()
    handled_at: list[float] = []

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        handled_at.append(trio.current_time())
        await kharon.ack(ticket.id)

    async with running(kharon, router):
        put_at = trio.current_time()
        await kharon.put(email(), delay=timedelta(seconds=42))
        await wait_until(lambda: is_removed(kharon, "t-1"))

    assert 42 <= handled_at[0] - put_at <= 42 + 0.02


async def test_workers_run_in_parallel(store: Store, autojump_clock: trio.testing.MockClock) -> None:
    kharon = make_kharon(store, settings(workers=4))
    router = Router()
    running_now = 0
    peak = 0

    @router.route("email")
    async def send(ticket: Ticket) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await trio.sleep(1)
        running_now -= 1
        await kharon.ack(ticket.id)

    await kharon.put_many([email(f"t-{n}") for n in range(10)])
    start = trio.current_time()

    async with running(kharon, router):
        await wait_until(lambda: _total_is(kharon, 0))
        elapsed = trio.current_time() - start

    assert peak == 4
    # Ten one-second tickets on four workers take three rounds.
    assert math.isclose(elapsed, 3, abs_tol=0.1)


async def _has_status(kharon: Kharon, ticket_id: str, status: TicketStatus) -> bool:
    return await status_of(kharon, ticket_id) is status


async def _all_removed(kharon: Kharon, *ticket_ids: str) -> bool:
    return all([await is_removed(kharon, ticket_id) for ticket_id in ticket_ids])


async def _total_is(kharon: Kharon, total: int) -> bool:
    return (await kharon.stats()).total == total
