"""Tests of the ticket model, its input checks and the delay strategies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pydantic
import pytest

from kharon import BackoffDelay, FixedDelay, Ticket, TicketStatus
from kharon._events import Event, EventKind
from kharon._ticket import MAX_DELAY, MAX_ID_LENGTH, NICE_MAX, NICE_MIN, as_delay, construct_unchecked

NAN = float("nan")
INF = float("inf")


class Address(pydantic.BaseModel):
    street: str
    number: int


# -- ids and types -------------------------------------------------------------


def test_ticket_defaults() -> None:
    ticket = Ticket(type="email")

    assert ticket.status is TicketStatus.PENDING
    assert ticket.attempts == 0
    assert ticket.nice == 0
    assert ticket.payload is None
    assert ticket.runat is None
    assert ticket.version == 0


def test_default_id_is_uuid7() -> None:
    ticket = Ticket(type="email")

    assert uuid.UUID(ticket.id).version == 7


def test_default_ids_increase() -> None:
    ids = [Ticket(type="email").id for _ in range(200)]

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_id_at_max_length_accepted() -> None:
    ticket = Ticket(id="x" * MAX_ID_LENGTH, type="email")

    assert len(ticket.id) == 255


@pytest.mark.parametrize(
    ("bad_id", "message"),
    [
        ("", "must not be empty"),
        ("x" * (MAX_ID_LENGTH + 1), "the limit is 255"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("tab\there", "control character"),
        ("del\x7f", "control character"),
        ("c1\x85", "control character"),
        (123, "valid string"),
    ],
    ids=["empty", "too-long", "newline", "nul", "tab", "del", "c1-control", "not-string"],
)
def test_bad_id_rejected(bad_id: object, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        Ticket(id=bad_id, type="email")


@pytest.mark.parametrize("bad_type", ["", "x" * 256, "new\nline", None])
def test_bad_type_rejected(bad_type: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type=bad_type)


def test_type_is_required() -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket()  # type: ignore[call-arg]


def test_unicode_id_accepted() -> None:
    ticket = Ticket(id="résumé-✓", type="email")

    assert ticket.id == "résumé-✓"


def test_unknown_field_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type="email", priority=1)  # type: ignore[call-arg]


# -- runat and other instants --------------------------------------------------


def test_naive_runat_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="naive datetime"):
        Ticket(type="email", runat=datetime(2030, 1, 1))


def test_runat_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))

    ticket = Ticket(type="email", runat=datetime(2030, 1, 1, 12, 0, tzinfo=plus_two))

    assert ticket.runat == datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
    assert ticket.runat.utcoffset() == timedelta(0)


def test_naive_runat_assignment_rejected() -> None:
    ticket = Ticket(type="email")

    with pytest.raises(pydantic.ValidationError):
        ticket.runat = datetime(2030, 1, 1)


# -- nice ----------------------------------------------------------------------


@pytest.mark.parametrize("nice", [NICE_MIN, -1, 0, 1, NICE_MAX])
def test_nice_in_range_accepted(nice: int) -> None:
    assert Ticket(type="email", nice=nice).nice == nice


@pytest.mark.parametrize("nice", [NICE_MIN - 1, NICE_MAX + 1, 2**63, 40_000 * 2**16])
def test_nice_out_of_range_rejected(nice: int) -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type="email", nice=nice)


@pytest.mark.parametrize("nice", [True, 1.5, "3", NAN])
def test_nice_non_integer_rejected(nice: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type="email", nice=nice)


def test_nice_assignment_checked() -> None:
    ticket = Ticket(type="email")

    with pytest.raises(pydantic.ValidationError):
        ticket.nice = NICE_MAX + 1


# -- payload and error reason --------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [NAN, INF, -INF, {"a": NAN}, [1, [2, INF]], {"nested": {"deep": [-INF]}}],
    ids=["nan", "inf", "minus-inf", "dict-nan", "list-inf", "nested"],
)
def test_payload_nan_or_infinity_rejected(payload: object) -> None:
    with pytest.raises(pydantic.ValidationError, match="NaN or an infinite number"):
        Ticket(type="email", payload=payload)


@pytest.mark.parametrize(
    "payload",
    [object(), {1, 2}, {"when": datetime(2030, 1, 1, tzinfo=UTC)}, b"bytes", {(1, 2): "tuple key"}],
    ids=["object", "set", "datetime", "bytes", "tuple-key"],
)
def test_payload_not_json_rejected(payload: object) -> None:
    with pytest.raises(pydantic.ValidationError, match="not JSON-serializable"):
        Ticket(type="email", payload=payload)


@pytest.mark.parametrize("payload", [None, True, 0, -2.5, "text", [], {}, {"a": [1, {"b": None}]}])
def test_payload_json_accepted(payload: object) -> None:
    assert Ticket(type="email", payload=payload).payload == payload


def test_payload_tuple_becomes_list() -> None:
    ticket = Ticket(type="email", payload={"pair": (1, 2)})

    assert ticket.payload == {"pair": [1, 2]}


def test_payload_model_dumped_as_json() -> None:
    ticket = Ticket(type="email", payload=Address(street="Main", number=3))

    assert ticket.payload == {"street": "Main", "number": 3}


def test_error_reason_from_exception() -> None:
    ticket = Ticket(type="email", error_reason=KeyError("to"))

    assert ticket.error_reason == "KeyError: 'to'"


def test_error_reason_exception_without_message() -> None:
    ticket = Ticket(type="email", error_reason=TimeoutError())

    assert ticket.error_reason == "TimeoutError"


def test_error_reason_nan_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type="email", error_reason={"code": NAN})


@pytest.mark.parametrize("attempts", [-1, True, 1.0])
def test_bad_attempts_rejected(attempts: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        Ticket(type="email", attempts=attempts)


# -- with_* builders -----------------------------------------------------------


def test_with_payload_returns_copy() -> None:
    original = Ticket(type="email", payload={"n": 1})

    changed = original.with_payload({"n": 2})

    assert changed.payload == {"n": 2}
    assert original.payload == {"n": 1}
    assert changed.id == original.id


def test_with_payload_copies_deeply() -> None:
    original = Ticket(type="email", payload={"items": [1]})

    changed = original.with_nice(5)
    changed.payload["items"].append(2)

    assert original.payload == {"items": [1]}


def test_with_nice_returns_copy() -> None:
    original = Ticket(type="email", nice=1)

    changed = original.with_nice(-7)

    assert changed.nice == -7
    assert original.nice == 1


def test_with_runat_returns_copy() -> None:
    original = Ticket(type="email")
    runat = datetime(2030, 5, 6, tzinfo=UTC)

    changed = original.with_runat(runat)

    assert changed.runat == runat
    assert original.runat is None


def test_with_payload_model() -> None:
    changed = Ticket(type="email").with_payload(Address(street="High", number=9))

    assert changed.payload == {"street": "High", "number": 9}


@pytest.mark.parametrize(
    ("builder", "value"),
    [
        ("with_payload", NAN),
        ("with_payload", object()),
        ("with_nice", NICE_MAX + 1),
        ("with_nice", True),
        ("with_runat", datetime(2030, 1, 1)),
    ],
    ids=["payload-nan", "payload-object", "nice-range", "nice-bool", "runat-naive"],
)
def test_with_builder_rejects_bad_input(builder: str, value: object) -> None:
    original = Ticket(type="email", payload={"n": 1})

    with pytest.raises(pydantic.ValidationError):
        getattr(original, builder)(value)

    assert original.payload == {"n": 1}
    assert original.nice == 0
    assert original.runat is None


# -- FixedDelay ----------------------------------------------------------------


@pytest.mark.parametrize("attempts", [0, 1, 10, 10**9])
def test_fixed_delay_ignores_attempts(attempts: int) -> None:
    assert FixedDelay(timedelta(seconds=7)).compute(attempts, 0.9) == timedelta(seconds=7)


def test_fixed_delay_from_seconds() -> None:
    assert FixedDelay(2.5).delay == timedelta(seconds=2.5)


def test_fixed_delay_zero_accepted() -> None:
    assert FixedDelay(0).delay == timedelta(0)


@pytest.mark.parametrize(
    "delay",
    [timedelta(seconds=-1), -0.001, NAN, INF, -INF, True, MAX_DELAY + timedelta(days=1), 10**12, "5"],
    ids=["negative-timedelta", "negative-seconds", "nan", "inf", "minus-inf", "bool", "too-long", "huge", "string"],
)
def test_fixed_delay_bad_input(delay: object) -> None:
    with pytest.raises(pydantic.ValidationError):
        FixedDelay(delay)  # type: ignore[arg-type]


def test_fixed_delay_is_frozen() -> None:
    delay = FixedDelay(1)

    with pytest.raises(pydantic.ValidationError):
        delay.delay = timedelta(seconds=2)  # type: ignore[misc]


# -- BackoffDelay --------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "attempts", "seconds"),
    [
        (1.5, 0, 1.0),
        (1.5, 1, 1.5),
        (1.5, 2, 2.25),
        (2.0, 3, 8.0),
        (2.0, 4, 16.0),
        (2.0, 5, 30.0),
        (1.0, 50, 1.0),
    ],
)
def test_backoff_formula(base: float, attempts: int, seconds: float) -> None:
    backoff = BackoffDelay(base, timedelta(seconds=30))

    assert backoff.compute(attempts) == timedelta(seconds=seconds)


@pytest.mark.parametrize("attempts", [10, 57, 100, 1_000, 1_751, 5_000, 25_000, 10**9])
def test_backoff_large_attempts_capped(attempts: int) -> None:
    backoff = BackoffDelay(1.5, timedelta(seconds=30))

    assert backoff.compute(attempts) == timedelta(seconds=30)


@pytest.mark.parametrize("attempts", [1_000, 5_000, 25_000, 10**9])
def test_backoff_large_attempts_with_jitter(attempts: int) -> None:
    backoff = BackoffDelay(2.0, 30, 4)

    assert backoff.compute(attempts, 1.0) == timedelta(seconds=34)


@pytest.mark.parametrize(("sample", "extra"), [(0.0, 0.0), (0.25, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_backoff_jitter_scales_with_sample(sample: float, extra: float) -> None:
    backoff = BackoffDelay(2.0, 100, 4)

    assert backoff.compute(2, sample) == timedelta(seconds=4 + extra)


def test_backoff_jitter_within_bounds() -> None:
    backoff = BackoffDelay(2.0, 100, 3)
    samples = [i / 100 for i in range(101)]

    delays = [backoff.compute(1, sample) for sample in samples]

    assert min(delays) == timedelta(seconds=2)
    assert max(delays) == timedelta(seconds=5)


def test_backoff_defaults() -> None:
    backoff = BackoffDelay()

    assert backoff.base == 1.5
    assert backoff.max_delay == timedelta(seconds=15)
    assert backoff.jitter == timedelta(0)


def test_backoff_zero_cap() -> None:
    assert BackoffDelay(2.0, 0).compute(3) == timedelta(0)


def test_backoff_negative_attempts_rejected() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        BackoffDelay().compute(-1)


@pytest.mark.parametrize(
    "arguments",
    [(0.5,), (NAN,), (INF,), (-2.0,), (1.5, -1), (1.5, NAN), (1.5, INF), (1.5, 10, -1), (1.5, 10, NAN), (1.5, 10, INF)],
    ids=[
        "base-below-one",
        "base-nan",
        "base-inf",
        "base-negative",
        "cap-negative",
        "cap-nan",
        "cap-inf",
        "jitter-negative",
        "jitter-nan",
        "jitter-inf",
    ],
)
def test_backoff_bad_input(arguments: tuple[float, ...]) -> None:
    with pytest.raises(pydantic.ValidationError):
        BackoffDelay(*arguments)


# -- as_delay ------------------------------------------------------------------


def test_as_delay_wraps_timedelta() -> None:
    assert as_delay(timedelta(seconds=3)) == FixedDelay(3)


def test_as_delay_keeps_strategies() -> None:
    backoff = BackoffDelay(2.0, 10)

    assert as_delay(backoff) is backoff
    assert as_delay(None) is None


@pytest.mark.parametrize("value", [5, 2.5, "5s"])
def test_as_delay_rejects_other_types(value: object) -> None:
    with pytest.raises(TypeError, match="delay must be"):
        as_delay(value)  # type: ignore[arg-type]


def test_as_delay_negative_timedelta() -> None:
    with pytest.raises(pydantic.ValidationError, match="must not be negative"):
        as_delay(timedelta(seconds=-5))


# -- construction without validation ---------------------------------------------


def _assert_same_model(built: pydantic.BaseModel, expected: pydantic.BaseModel) -> None:
    assert type(built) is type(expected)
    assert built == expected
    assert built.__dict__ == expected.__dict__
    assert built.model_fields_set == expected.model_fields_set
    assert built.__pydantic_extra__ == expected.__pydantic_extra__
    assert built.__pydantic_private__ == expected.__pydantic_private__


def test_construct_unchecked_ticket_matches() -> None:
    now = datetime(2024, 5, 1, tzinfo=UTC)
    fields = Ticket(type="email", payload={"to": "a@example.com"}, runat=now, created_at=now).model_dump()

    built = construct_unchecked(Ticket, dict(fields))

    _assert_same_model(built, Ticket.model_construct(**fields))


def test_construct_unchecked_event_matches() -> None:
    fields = {
        "seq": 7,
        "ticket_id": "t1",
        "version": 2,
        "kind": EventKind.LEASE,
        "at": datetime(2024, 5, 1, tzinfo=UTC),
        "actor": "worker-0",
        "status_before": TicketStatus.PENDING,
        "status_after": TicketStatus.RUNNING,
        "changes": {"attempts": 1},
        "schema_version": 1,
    }

    built = construct_unchecked(Event, dict(fields))

    _assert_same_model(built, Event.model_construct(**fields))


def test_construct_unchecked_partial_fields_use_defaults() -> None:
    built = construct_unchecked(Ticket, {"id": "t1", "type": "email"})

    _assert_same_model(built, Ticket.model_construct(id="t1", type="email"))
    assert built.status is TicketStatus.PENDING


@pytest.mark.parametrize(
    "runat",
    [
        datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_runat_out_of_utc_range_rejected(runat: datetime) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Ticket(type="email", runat=runat)

    assert "out of range once converted to UTC" in str(caught.value)


def nested_lists(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_payload_at_depth_limit_accepted() -> None:
    ticket = Ticket(type="email", payload=nested_lists(100))

    assert ticket.payload == nested_lists(100)


@pytest.mark.parametrize("depth", [101, 5000])
def test_payload_too_deep_rejected(depth: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="nested more than 100 levels"):
        Ticket(type="email", payload=nested_lists(depth))


def test_payload_lone_surrogate_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="lone surrogate"):
        Ticket(type="email", payload={"name": "\ud800"})


def test_payload_huge_int_named_correctly() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        Ticket(type="email", payload={"n": 10**5000})

    assert "NaN" not in str(caught.value)
    assert "digits" in str(caught.value)


def test_exception_reason_escapes_surrogates() -> None:
    ticket = Ticket(type="email", error_reason=OSError("bad \udcff name"))

    assert ticket.error_reason == "OSError: bad \\udcff name"
    ticket.error_reason.encode("utf-8")


def test_construct_unchecked_dumps_like_validated() -> None:
    fields = {"version": 1, "type": "email", "id": "t-1"}
    for name, info in Ticket.model_fields.items():
        if name not in fields:
            fields[name] = info.get_default(call_default_factory=True)

    built = construct_unchecked(Ticket, dict(fields))

    validated = Ticket.model_validate(fields)
    assert built.model_dump_json() == validated.model_dump_json()
    assert repr(built) == repr(validated)
