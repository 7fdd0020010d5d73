"""The Kharon facade's own checks, on the memory store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio.testing

from kharon import Kharon, Ticket, TrioClock
from kharon.stores import MemoryStore


@pytest.fixture
def kharon() -> Kharon:
    return Kharon(MemoryStore(), clock=TrioClock(datetime(2026, 1, 1, tzinfo=UTC)), actor="test")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("error_reason", "set at put"),
        ("version", 7),
        ("expires_at", datetime(2030, 1, 1, tzinfo=UTC)),
        ("status", "done"),
        ("attempts", 3),
    ],
)
async def test_put_update_rejects_field(
    kharon: Kharon, autojump_clock: trio.testing.MockClock, field: str, value: object
) -> None:
    def edit(ticket: Ticket) -> None:
        setattr(ticket, field, value)

    with pytest.raises(ValueError, match=f"may not change '{field}'"):
        await kharon.put(Ticket(id="t-1", type="email"), update=edit)

    assert await kharon.store.get("t-1") is None


async def test_settle_update_rejects_updated_at(kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
    await kharon.put(Ticket(id="t-1", type="email"))

    def edit(ticket: Ticket) -> None:
        ticket.updated_at = datetime(2030, 1, 1, tzinfo=UTC)

    with pytest.raises(ValueError, match="may not change 'updated_at'"):
        await kharon.retry("t-1", update=edit)

    assert (await kharon.get("t-1")).version == 1


async def test_settle_update_cannot_clear_runat(kharon: Kharon, autojump_clock: trio.testing.MockClock) -> None:
    await kharon.put(Ticket(id="t-1", type="email"))

    def edit(ticket: Ticket) -> None:
        ticket.runat = None

    with pytest.raises(ValueError, match="may not clear 'runat'"):
        await kharon.retry("t-1", update=edit)

    assert (await kharon.get("t-1")).version == 1


@pytest.mark.parametrize("actor", ["", "bad\nactor", "x" * 256])
def test_bad_actor_rejected(actor: str) -> None:
    with pytest.raises(ValueError, match="actor"):
        Kharon(MemoryStore(), actor=actor)
