"""The built-in example router: what `kharon serve` runs when no `--app` is given.

Each ticket type shows one way a handler can settle its ticket:

==========  ===============================================================
type        outcome
==========  ===============================================================
``ack``     acknowledged, so it is removed
``backoff`` retried with exponential backoff until its 5th delivery, then acked
``fail``    failed with the reason "failed by handler", removed after 10 s
``done``    kept as done
``cancel``  cancelled, so it is removed
other       failed with the reason "unsupported ticket type", removed after 30 s
==========  ===============================================================

The types and outcomes are those of the HTTP example of lymbo, the Go library
Kharon ports.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from kharon._kharon import Kharon
from kharon._router import Router
from kharon._ticket import Ticket

__all__ = ["BACKOFF_ATTEMPTS", "FAIL_TTL", "UNSUPPORTED_TTL", "create_router"]

logger = logging.getLogger("kharon.example")

# A `backoff` ticket is acked on this delivery (attempts count from 1).
BACKOFF_ATTEMPTS = 5
# How long a failed ticket stays readable before the expirer removes it.
FAIL_TTL = timedelta(seconds=10)
UNSUPPORTED_TTL = timedelta(seconds=30)


def create_router(kharon: Kharon) -> Router:
    """Build the example router; its handlers settle tickets through `kharon`."""
    router = Router()

    @router.route("ack")
    async def ack(ticket: Ticket) -> None:
        await kharon.ack(ticket.id)

    @router.route("backoff")
    async def backoff(ticket: Ticket) -> None:
        if ticket.attempts >= BACKOFF_ATTEMPTS:
            await kharon.ack(ticket.id)
            return
        # With the default settings this is BackoffDelay(1.5, 15 s, 0): the
        # retries wait 1.5, 2.25, 3.4 and 5.1 s. `kharon serve --backoff-base`
        # and `--max-backoff-delay` change it.
        delay = kharon.settings.backoff
        logger.info(
            "ticket %s: backoff attempt %d of %d, retrying in %.3f s",
            ticket.id,
            ticket.attempts,
            BACKOFF_ATTEMPTS,
            delay.compute(ticket.attempts).total_seconds(),
        )
        await kharon.retry(ticket.id, delay=delay)

    @router.route("fail")
    async def fail(ticket: Ticket) -> None:
        await kharon.fail(ticket.id, error_reason="failed by handler", delay=FAIL_TTL)

    @router.route("done")
    async def done(ticket: Ticket) -> None:
        await kharon.done(ticket.id)

    @router.route("cancel")
    async def cancel(ticket: Ticket) -> None:
        await kharon.cancel(ticket.id)

    @router.not_found
    async def unsupported(ticket: Ticket) -> None:
        logger.warning("ticket %s has the unsupported type %r; failing it", ticket.id, ticket.type)
        await kharon.fail(ticket.id, error_reason="unsupported ticket type", delay=UNSUPPORTED_TTL)

    return router
