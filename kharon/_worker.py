"""The Trio runtime behind `Kharon.run`: poller, handlers, expirer, shutdown.

Task layout::

    run_workers
    ├── poller (this task)       leases due tickets for free worker slots
    ├── expirer                  removes finished tickets whose TTL passed
    └── handler host (shielded)  one task per leased ticket, at most `workers`

The poller only leases as many tickets as there are free slots, so a leased
ticket does not wait for a worker while its lease runs down. Cancelling `run`
cancels the poller and the expirer at once; the handler host is shielded from
that cancellation and gets `shutdown_grace_period` to let running handlers
finish. Handlers still running then are cancelled, and their tickets are put
back to pending at once (a fenced retry with no delay).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import timedelta
from typing import TYPE_CHECKING

import trio
from pydantic import ValidationError

from kharon._commands import ExpireCommand, LeaseCommand
from kharon._errors import InvalidTransition, KharonError, LeaseLost, StoreClosed, TicketNotFound
from kharon._kharon import Delivery, _delivery
from kharon._router import Router
from kharon._ticket import FixedDelay, Ticket

if TYPE_CHECKING:
    from kharon._kharon import Kharon

__all__ = ["run_workers"]

logger = logging.getLogger("kharon.worker")

# How long the shielded write that releases an interrupted ticket may take
# during shutdown before it is abandoned (the lease then expires as usual).
_RELEASE_TIMEOUT = 5.0


class _Slots:
    """Free worker slots; slot numbers name the workers in logs and events."""

    def __init__(self, count: int) -> None:
        self._free = list(range(count - 1, -1, -1))
        self._released = trio.Event()

    async def take(self, limit: int) -> list[int]:
        """Wait for at least one free slot, then take up to `limit`."""
        while not self._free:
            await self._released.wait()
        slots = self._free[-limit:][::-1]
        del self._free[-limit:]
        return slots

    def give(self, slot: int) -> None:
        self._free.append(slot)
        self._released.set()
        self._released = trio.Event()


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(trio.Cancelled) is not None


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


class _Runtime:
    def __init__(self, kharon: Kharon, router: Router) -> None:
        self.kharon = kharon
        self.router = router
        self.settings = kharon.settings
        self.slots = _Slots(self.settings.workers)
        self.node = kharon.actor

    # -- poller --------------------------------------------------------------

    async def poll_forever(self, handlers: trio.Nursery) -> None:
        settings = self.settings
        min_interval = _seconds(settings.min_poll_interval)
        max_interval = _seconds(settings.max_poll_interval)
        error_delay = min_interval
        last_poll = -math.inf
        store = self.kharon.store
        clock = self.kharon.clock
        # `Settings.backoff` builds and validates a new model on each access.
        backoff = settings.backoff
        batch_size = settings.effective_batch_size
        actor = f"{self.node}/poller"

        while True:
            slots = await self.slots.take(batch_size)
            now = clock.now()
            command = LeaseCommand(
                limit=len(slots),
                now=now,
                process_time=settings.process_time,
                backoff=backoff,
                actor=actor,
                max_attempts=settings.max_attempts,
            )
            last_poll = trio.current_time()
            # Taken before the lease, so a put that commits while the lease
            # runs (even in the same batch) still wakes the wait below.
            change_token = store.change_token()
            try:
                result = await store.lease(command)
            except StoreClosed:
                raise
            except Exception as exc:
                for slot in slots:
                    self.slots.give(slot)
                logger.error("poll failed, next try in %.3f s: %s", error_delay, exc, exc_info=exc)
                await trio.sleep(error_delay)
                error_delay = min(error_delay * 2, max_interval)
                continue
            error_delay = min_interval

            for ticket in result.exhausted:
                logger.warning(
                    "ticket %s failed: delivered %d times, max_attempts is %s",
                    ticket.id,
                    ticket.attempts,
                    settings.max_attempts,
                )
            for ticket, slot in zip(result.tickets, slots, strict=False):
                handlers.start_soon(self.process, ticket, slot, name=f"kharon ticket {ticket.id}")
            for slot in slots[len(result.tickets) :]:
                self.slots.give(slot)
            if len(result.tickets) == len(slots):
                # Every slot got a ticket: more may be due, poll as soon as a slot frees.
                continue

            # Nothing more is due now. Sleep until the next ticket is due, at
            # most max_poll_interval, unless a write in this process (or, as
            # the store allows, another process) wakes us first.
            if result.next_due_at is None:
                wait = max_interval
            else:
                wait = min(max(_seconds(result.next_due_at - clock.now()), 0.0), max_interval)
            with trio.move_on_after(wait):
                await store.wait_for_change(change_token)
            # At most one idle poll per min_poll_interval, however often we are woken.
            await trio.sleep_until(last_poll + min_interval)

    # -- expirer -------------------------------------------------------------

    async def expire_forever(self) -> None:
        settings = self.settings
        interval = _seconds(settings.expiration_interval)
        store = self.kharon.store
        while True:
            await trio.sleep(interval)
            try:
                while True:
                    command = ExpireCommand(
                        limit=settings.expiration_batch_size,
                        now=self.kharon.clock.now(),
                        actor=f"{self.node}/expirer",
                    )
                    removed = await store.expire(command)
                    if removed:
                        logger.debug("expired %d tickets", removed)
                    if removed < command.limit:
                        break
            except StoreClosed:
                raise
            except Exception as exc:
                logger.error("expiration pass failed: %s", exc, exc_info=exc)

    # -- handlers ------------------------------------------------------------

    async def process(self, ticket: Ticket, slot: int) -> None:
        worker = f"{self.node}/worker-{slot}"
        assert ticket.lease_version is not None
        assert ticket.runat is not None
        token = _delivery.set(Delivery(ticket.id, ticket.attempts, ticket.lease_version, worker))
        try:
            lease_left = _seconds(ticket.runat - self.kharon.clock.now())
            with trio.CancelScope(deadline=trio.current_time() + lease_left) as lease_scope:
                try:
                    await self.dispatch(ticket)
                except Exception as exc:
                    await self.after_failure(ticket, exc)
            if lease_scope.cancelled_caught:
                await self.after_timeout(ticket)
        except BaseException as exc:
            # Shutdown: the grace period ran out while the handler was running.
            # A handler's own nursery reports the cancellation in a group.
            if _is_cancellation(exc):
                await self.release(ticket)
            raise
        finally:
            _delivery.reset(token)
            self.slots.give(slot)

    async def dispatch(self, ticket: Ticket) -> None:
        route = self.router.resolve(ticket)
        if route is None:
            logger.warning("ticket %s has type %r, which has no handler; failing it", ticket.id, ticket.type)
            await self.kharon.fail(ticket.id, error_reason=f"no handler is registered for ticket type {ticket.type!r}")
            return
        if route.payload_model is None:
            await route.handler(ticket)
            return
        try:
            payload = route.payload_model.model_validate(ticket.payload)
        except ValidationError as exc:
            model_name = route.payload_model.__name__
            logger.warning("ticket %s has an invalid payload for %s; failing it", ticket.id, model_name)
            reason = {
                "error": f"payload does not match {route.payload_model.__name__}",
                "details": json.loads(exc.json(include_url=False)),
            }
            await self.kharon.fail(ticket.id, error_reason=reason)
            return
        await route.handler(ticket, payload)

    async def after_failure(self, ticket: Ticket, exc: Exception) -> None:
        logger.error("handler for ticket %s (type %r) raised %r; retrying", ticket.id, ticket.type, exc, exc_info=exc)
        await self.settle_quietly(ticket, "retry after handler error", error_reason=exc)

    async def after_timeout(self, ticket: Ticket) -> None:
        seconds = _seconds(self.settings.process_time)
        logger.warning("handler for ticket %s timed out at its lease expiry; retrying", ticket.id)
        await self.settle_quietly(
            ticket,
            "retry after timeout",
            error_reason=f"handler did not finish before its lease expired (process_time {seconds} s)",
        )

    async def settle_quietly(
        self, ticket: Ticket, what: str, *, error_reason: object, delay: FixedDelay | None = None
    ) -> None:
        """Retry a ticket whose handler did not settle it; log instead of raising."""
        try:
            await self.kharon.retry(ticket.id, error_reason=error_reason, delay=delay)
        except LeaseLost:
            # Kharon's settle call already logged the lost lease.
            logger.debug("%s of ticket %s skipped: its lease was lost to another worker", what, ticket.id)
        except (InvalidTransition, TicketNotFound) as exc:
            # The handler settled or deleted the ticket before it failed.
            logger.info("%s of ticket %s skipped: %s", what, ticket.id, exc)
        except KharonError as exc:
            logger.error("%s of ticket %s failed: %s", what, ticket.id, exc, exc_info=exc)
        except Exception as exc:
            logger.error("%s of ticket %s failed in the store: %s", what, ticket.id, exc, exc_info=exc)

    async def release(self, ticket: Ticket) -> None:
        logger.warning("shutdown interrupted the handler of ticket %s; releasing it to pending", ticket.id)
        with trio.move_on_after(_RELEASE_TIMEOUT) as scope:
            scope.shield = True
            await self.settle_quietly(
                ticket,
                "release on shutdown",
                error_reason="worker shut down before the handler finished",
                delay=FixedDelay(0),
            )
        if scope.cancelled_caught:
            logger.error("release of ticket %s timed out; it is due again when its lease expires", ticket.id)


async def run_workers(
    kharon: Kharon, router: Router, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the poller, the expirer and the handlers until cancelled."""
    runtime = _Runtime(kharon, router)
    settings = kharon.settings
    stopping = trio.Event()
    handler_scope = trio.CancelScope(shield=True)

    async def host_handlers(task_status: trio.TaskStatus[trio.Nursery]) -> None:
        with handler_scope:
            async with trio.open_nursery() as handlers:
                task_status.started(handlers)
                await stopping.wait()

    logger.info(
        "workers starting: %d workers, batch size %d, process_time %s s, actor %s",
        settings.workers,
        settings.effective_batch_size,
        settings.process_time.total_seconds(),
        kharon.actor,
    )
    try:
        async with trio.open_nursery() as nursery:
            # `Kharon.cancel_handlers` cancels both: polling and the handlers.
            scopes = (nursery.cancel_scope, handler_scope)
            kharon._run_scopes.add(scopes)
            handlers = await nursery.start(host_handlers)
            if settings.enable_expiration:
                nursery.start_soon(runtime.expire_forever, name="kharon expirer")
            task_status.started()
            try:
                await runtime.poll_forever(handlers)
            finally:
                # Stop taking work; running handlers get the grace period.
                handler_scope.deadline = trio.current_time() + settings.shutdown_grace_period.total_seconds()
                stopping.set()
                nursery.cancel_scope.cancel()
                kharon._run_scopes.discard(scopes)
    finally:
        logger.info("workers stopped")
