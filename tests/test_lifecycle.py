"""Tests of the pure lifecycle: the transition table, the decisions and the fold.

The expected table below is written out by hand from the documented
lifecycle, independently of `kharon._lifecycle.TRANSITIONS`, and every
(state, operation, condition) combination is checked against it.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta

import pytest

from kharon import (
    BackoffDelay,
    EventKind,
    FixedDelay,
    InvalidTransition,
    LeaseLost,
    Ticket,
    TicketNotFound,
    TicketStatus,
    VersionConflict,
    fold,
    replay,
)
from kharon._commands import DeleteCommand, LeaseCommand, PutCommand, SettleCommand, SettleOperation
from kharon._lifecycle import (
    allowed_operations,
    decide_delete,
    decide_expire,
    decide_lease,
    decide_put,
    decide_settle,
    destination,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)

STATES = ["absent", "pending", "running", "done", "failed", "cancelled"]
OPERATIONS = ["put", "lease", "retry", "done", "fail", "ack", "cancel", "expire", "delete"]
ACTIVE = {"pending", "running"}
FINISHED = {"done", "failed", "cancelled"}

# The operations each state allows, whatever the conditions.
EXPECTED_ALLOWED = {
    "absent": {"put"},
    "pending": {"put", "lease", "retry", "done", "fail", "ack", "cancel", "delete"},
    "running": {"lease", "retry", "done", "fail", "ack", "cancel", "delete"},
    "done": {"put", "expire", "delete"},
    "failed": {"put", "expire", "delete"},
    "cancelled": {"put", "expire", "delete"},
}


def expected_destination(state: str, operation: str, *, due: bool, keep: bool, expired: bool) -> str | None:
    """Return the destination the lifecycle table gives, or None when it rejects the call."""
    if operation == "put":
        return "pending" if state != "running" else None
    if operation == "delete":
        return "absent" if state != "absent" else None
    if operation == "expire":
        return "absent" if state in FINISHED and expired else None
    if state not in ACTIVE:
        return None
    if operation == "lease":
        return "running" if due else None
    if operation == "ack":
        return "done" if keep else "absent"
    if operation == "cancel":
        return "cancelled" if keep else "absent"
    return {"retry": "pending", "done": "done", "fail": "failed"}[operation]


FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(("due", "keep", "expired"), FLAGS, ids=lambda flag: "yes" if flag else "no")
@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("state", STATES)
def test_destination_matches_table(state: str, operation: str, due: bool, keep: bool, expired: bool) -> None:
    expected = expected_destination(state, operation, due=due, keep=keep, expired=expired)

    if expected is None:
        with pytest.raises(InvalidTransition) as caught:
            destination("t-1", state, operation, due=due, keep=keep, expired=expired)
        error = caught.value
        assert error.ticket_id == "t-1"
        assert error.state == state
        assert error.operation == operation
        assert set(error.allowed) == EXPECTED_ALLOWED[state]
        assert f"'{operation}' is not allowed for ticket 't-1' in state '{state}'" in str(error)
        for allowed in EXPECTED_ALLOWED[state]:
            assert allowed in str(error)
    else:
        assert destination("t-1", state, operation, due=due, keep=keep, expired=expired) == expected


@pytest.mark.parametrize("state", STATES)
def test_allowed_operations_per_state(state: str) -> None:
    assert set(allowed_operations(state)) == EXPECTED_ALLOWED[state]


@pytest.mark.parametrize("state", ["pending", "running"])
def test_lease_not_due_says_why(state: str) -> None:
    with pytest.raises(InvalidTransition) as caught:
        destination("t-1", state, "lease", due=False)

    assert caught.value.reason is not None
    assert "not due" in str(caught.value)


@pytest.mark.parametrize("state", sorted(FINISHED))
def test_expire_before_ttl_says_why(state: str) -> None:
    with pytest.raises(InvalidTransition) as caught:
        destination("t-1", state, "expire", expired=False)

    assert caught.value.reason is not None
    assert "TTL" in str(caught.value)


def test_invalid_transition_is_kharon_error() -> None:
    from kharon import KharonError

    with pytest.raises(KharonError):
        destination("t-1", "absent", "ack")


def test_destination_safe_across_threads() -> None:
    """The state machine is per thread; concurrent decisions must not see each other's state."""
    failures: list[BaseException] = []

    def decide_many(state: str, operation: str, expected: str) -> None:
        try:
            for _ in range(500):
                assert destination("t-1", state, operation, keep=True, due=True) == expected
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=decide_many, args=("pending", "lease", "running")),
        threading.Thread(target=decide_many, args=("running", "fail", "failed")),
        threading.Thread(target=decide_many, args=("done", "put", "pending")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []


# -- decisions -----------------------------------------------------------------


def put_event(ticket: Ticket, last_version: int = 0, current: Ticket | None = None, now: datetime = NOW):
    return decide_put(current, PutCommand(ticket, now, "tester"), last_version)


def pending_ticket(**fields) -> Ticket:
    """Return the projection of a freshly put ticket, built through the fold."""
    ticket = Ticket(id=fields.pop("id", "t-1"), type=fields.pop("type", "email"), **fields)
    folded = fold(None, put_event(ticket))
    assert folded is not None
    return folded


def with_state(ticket: Ticket, **fields) -> Ticket:
    return ticket.model_copy(update=fields)


def lease_command(
    now: datetime = NOW, process_time: timedelta = timedelta(seconds=30), base: float = 2.0, cap: float = 60.0
) -> LeaseCommand:
    return LeaseCommand(limit=10, now=now, process_time=process_time, backoff=BackoffDelay(base, cap), actor="poller")


def settle_command(operation: SettleOperation, **fields) -> SettleCommand:
    return SettleCommand(operation=operation, ticket_id=fields.pop("ticket_id", "t-1"), now=NOW, **fields)


def test_decide_put_new_ticket() -> None:
    ticket = Ticket(id="t-1", type="email", payload={"to": "a@example.com"}, nice=3)

    event = put_event(ticket)

    assert event.kind is EventKind.PUT
    assert event.ticket_id == "t-1"
    assert event.version == 1
    assert event.status_before is None
    assert event.status_after is TicketStatus.PENDING
    assert event.at == NOW
    assert event.actor == "tester"
    assert event.changes["attempts"] == 0
    assert event.changes["runat"] == NOW.isoformat()
    assert event.changes["payload"] == {"to": "a@example.com"}
    assert event.changes["nice"] == 3
    assert event.changes["type"] == "email"


def test_decide_put_keeps_given_runat() -> None:
    runat = NOW + timedelta(hours=1)

    event = put_event(Ticket(id="t-1", type="email", runat=runat))

    assert event.changes["runat"] == runat.isoformat()


def test_decide_put_after_removal_continues_versions() -> None:
    event = put_event(Ticket(id="t-1", type="email"), last_version=7)

    assert event.version == 8
    assert event.status_before is None


@pytest.mark.parametrize("status", [TicketStatus.DONE, TicketStatus.FAILED, TicketStatus.CANCELLED])
def test_decide_put_restarts_finished_ticket(status: TicketStatus) -> None:
    current = with_state(pending_ticket(), status=status, attempts=4, version=5, error_reason="boom")

    event = put_event(Ticket(id="t-1", type="email"), last_version=5, current=current)
    restarted = fold(current, event)

    assert event.version == 6
    assert event.status_before is status
    assert restarted is not None
    assert restarted.status is TicketStatus.PENDING
    assert restarted.attempts == 0
    assert restarted.error_reason is None
    assert restarted.expires_at is None
    assert restarted.lease_version is None


def test_decide_put_over_running_raises() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=1, version=2)

    with pytest.raises(InvalidTransition) as caught:
        put_event(Ticket(id="t-1", type="email"), last_version=2, current=current)

    assert caught.value.state == "running"


@pytest.mark.parametrize(
    ("attempts", "backoff_seconds"),
    [(0, 1.0), (1, 2.0), (3, 8.0), (5, 32.0), (6, 60.0), (1_000, 60.0), (25_000, 60.0), (10**9, 60.0)],
)
def test_decide_lease_expiry_formula(attempts: int, backoff_seconds: float) -> None:
    current = with_state(pending_ticket(), attempts=attempts)

    event = decide_lease(current, lease_command())

    assert event.kind is EventKind.LEASE
    assert event.status_after is TicketStatus.RUNNING
    assert event.changes["attempts"] == attempts + 1
    expiry = NOW + timedelta(seconds=30) + timedelta(seconds=backoff_seconds)
    assert event.changes["runat"] == expiry.isoformat()


def test_decide_lease_not_due_raises() -> None:
    current = pending_ticket(runat=NOW + timedelta(seconds=1))

    with pytest.raises(InvalidTransition):
        decide_lease(current, lease_command())


def test_decide_lease_expired_running() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=1, version=2, runat=NOW)

    event = decide_lease(current, lease_command())

    assert event.status_before is TicketStatus.RUNNING
    assert event.status_after is TicketStatus.RUNNING
    assert event.changes["attempts"] == 2
    assert event.version == 3


def test_decide_lease_running_still_leased() -> None:
    current = with_state(
        pending_ticket(), status=TicketStatus.RUNNING, attempts=1, version=2, runat=NOW + timedelta(microseconds=1)
    )

    with pytest.raises(InvalidTransition):
        decide_lease(current, lease_command())


def test_fold_lease_sets_lease_version() -> None:
    current = pending_ticket()

    leased = fold(current, decide_lease(current, lease_command()))

    assert leased is not None
    assert leased.lease_version == 2
    assert leased.version == 2


def test_decide_retry_sets_runat() -> None:
    current = pending_ticket()

    event = decide_settle(current, settle_command(SettleOperation.RETRY, delay=FixedDelay(5)))

    assert event.kind is EventKind.RETRY
    assert event.status_after is TicketStatus.PENDING
    assert event.changes["runat"] == (NOW + timedelta(seconds=5)).isoformat()


def test_decide_retry_backoff_on_attempts() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=3, version=4)
    command = settle_command(SettleOperation.RETRY, delay=BackoffDelay(2, 100, 10), jitter_sample=0.5)

    event = decide_settle(current, command)

    assert event.changes["runat"] == (NOW + timedelta(seconds=8 + 5)).isoformat()


def test_decide_retry_without_delay_is_now() -> None:
    current = pending_ticket(runat=NOW + timedelta(hours=1))

    event = decide_settle(current, settle_command(SettleOperation.RETRY))

    assert event.changes["runat"] == NOW.isoformat()


@pytest.mark.parametrize(
    ("operation", "keep", "status"),
    [
        (SettleOperation.DONE, True, TicketStatus.DONE),
        (SettleOperation.FAIL, True, TicketStatus.FAILED),
        (SettleOperation.ACK, True, TicketStatus.DONE),
        (SettleOperation.CANCEL, True, TicketStatus.CANCELLED),
    ],
)
def test_decide_settle_kept_with_ttl(operation: SettleOperation, keep: bool, status: TicketStatus) -> None:
    current = pending_ticket()

    event = decide_settle(current, settle_command(operation, keep=keep, delay=FixedDelay(60)))
    settled = fold(current, event)

    assert event.status_after is status
    assert settled is not None
    assert settled.status is status
    assert settled.expires_at == NOW + timedelta(seconds=60)


def test_decide_done_without_ttl_kept_forever() -> None:
    current = pending_ticket()

    settled = fold(current, decide_settle(current, settle_command(SettleOperation.DONE, keep=True)))

    assert settled is not None
    assert settled.expires_at is None


@pytest.mark.parametrize("operation", [SettleOperation.ACK, SettleOperation.CANCEL])
def test_decide_removal_records_reason(operation: SettleOperation) -> None:
    current = pending_ticket()

    event = decide_settle(current, settle_command(operation, keep=False, error_reason="no longer wanted"))

    assert event.status_after is None
    assert event.removes
    assert event.changes["error_reason"] == "no longer wanted"
    assert fold(current, event) is None


def test_decide_settle_options_in_changes() -> None:
    current = pending_ticket()
    runat = NOW + timedelta(minutes=3)
    command = settle_command(SettleOperation.RETRY, nice=-4, payload={"step": 2}, runat=runat, error_reason="later")

    settled = fold(current, decide_settle(current, command))

    assert settled is not None
    assert settled.nice == -4
    assert settled.payload == {"step": 2}
    assert settled.runat == runat
    assert settled.error_reason == "later"


def test_decide_settle_missing_ticket() -> None:
    with pytest.raises(TicketNotFound) as caught:
        decide_settle(None, settle_command(SettleOperation.ACK, ticket_id="gone"))

    assert caught.value.ticket_id == "gone"
    assert caught.value.operation == "ack"


def test_decide_settle_stale_lease() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=2, version=3, lease_version=3)

    with pytest.raises(LeaseLost) as caught:
        decide_settle(current, settle_command(SettleOperation.ACK, lease=1))

    assert caught.value.lease == 1
    assert caught.value.current == 2
    assert "ack" in str(caught.value)


def test_decide_settle_stale_lease_version() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=1, version=5, lease_version=5)

    with pytest.raises(LeaseLost):
        decide_settle(current, settle_command(SettleOperation.ACK, lease=1, lease_version=2))


def test_decide_settle_current_lease_accepted() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.RUNNING, attempts=2, version=3, lease_version=3)

    event = decide_settle(current, settle_command(SettleOperation.DONE, keep=True, lease=2, lease_version=3))

    assert event.status_after is TicketStatus.DONE


def test_decide_settle_version_conflict() -> None:
    current = with_state(pending_ticket(), version=4)

    with pytest.raises(VersionConflict) as caught:
        decide_settle(current, settle_command(SettleOperation.RETRY, expected_version=3))

    assert caught.value.expected == 3
    assert caught.value.actual == 4


@pytest.mark.parametrize("status", [TicketStatus.DONE, TicketStatus.FAILED, TicketStatus.CANCELLED])
def test_decide_expire_after_ttl(status: TicketStatus) -> None:
    current = with_state(pending_ticket(), status=status, version=2, expires_at=NOW)

    event = decide_expire(current, NOW, "expirer")

    assert event.kind is EventKind.EXPIRE
    assert event.status_before is status
    assert event.removes
    assert event.version == 3


def test_decide_expire_before_ttl_raises() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.DONE, version=2, expires_at=NOW + timedelta(seconds=1))

    with pytest.raises(InvalidTransition):
        decide_expire(current, NOW, "expirer")


def test_decide_expire_without_ttl_raises() -> None:
    current = with_state(pending_ticket(), status=TicketStatus.FAILED, version=2, expires_at=None)

    with pytest.raises(InvalidTransition):
        decide_expire(current, NOW + timedelta(days=10_000), "expirer")


@pytest.mark.parametrize("status", list(TicketStatus))
def test_decide_delete_any_state(status: TicketStatus) -> None:
    current = with_state(pending_ticket(), status=status, version=2)

    event = decide_delete(current, DeleteCommand("t-1", NOW, "tester"))

    assert event.kind is EventKind.DELETE
    assert event.status_before is status
    assert event.removes


# -- fold and replay -----------------------------------------------------------


def test_fold_event_without_put_raises() -> None:
    current = pending_ticket()
    lease = decide_lease(current, lease_command())

    with pytest.raises(ValueError, match="follows no put"):
        fold(None, lease)


def test_fold_out_of_order_raises() -> None:
    current = pending_ticket()
    lease = decide_lease(current, lease_command())
    leased = fold(current, lease)

    with pytest.raises(ValueError, match="does not follow"):
        fold(leased, lease)


def test_replay_whole_lifecycle() -> None:
    ticket = Ticket(id="t-1", type="email", payload={"n": 1})
    events = []
    state: Ticket | None = None
    steps = [
        lambda s: put_event(ticket),
        lambda s: decide_lease(s, lease_command()),
        lambda s: decide_settle(s, settle_command(SettleOperation.RETRY, delay=FixedDelay(0), error_reason="x")),
        lambda s: decide_lease(s, lease_command()),
        lambda s: decide_settle(s, settle_command(SettleOperation.DONE, keep=True, delay=FixedDelay(10))),
        lambda s: decide_expire(s, NOW + timedelta(seconds=10), "expirer"),
        lambda s: put_event(ticket, last_version=6, current=s),
    ]
    snapshots = []
    for step in steps:
        event = step(state)
        events.append(event)
        state = fold(state, event)
        snapshots.append(state)

    for count, snapshot in enumerate(snapshots, start=1):
        assert replay(events[:count]) == snapshot
    assert [event.version for event in events] == [1, 2, 3, 4, 5, 6, 7]
    assert snapshots[-1] is not None
    assert snapshots[-1].attempts == 0
    assert snapshots[-2] is None


def test_replay_empty_is_absent() -> None:
    assert replay([]) is None
