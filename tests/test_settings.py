"""Tests of `Settings` validation and its derived values."""

from __future__ import annotations

from datetime import timedelta

import pydantic
import pytest

from kharon import BackoffDelay, Kharon, Settings
from kharon._ticket import MAX_DELAY
from kharon.stores import MemoryStore

NAN = float("nan")
INF = float("inf")


def test_defaults_are_valid() -> None:
    settings = Settings()

    assert settings.workers >= 1
    assert settings.process_time > timedelta(0)
    assert settings.min_poll_interval <= settings.max_poll_interval
    assert settings.max_attempts is None


def test_seconds_become_timedelta() -> None:
    settings = Settings(process_time=2.5, max_poll_interval=3, shutdown_grace_period=0)

    assert settings.process_time == timedelta(seconds=2.5)
    assert settings.max_poll_interval == timedelta(seconds=3)
    assert settings.shutdown_grace_period == timedelta(0)


@pytest.mark.parametrize(("workers", "batch_size", "effective"), [(4, 10, 4), (8, 3, 3), (1, 1, 1)])
def test_batch_size_capped_at_workers(workers: int, batch_size: int, effective: int) -> None:
    assert Settings(workers=workers, batch_size=batch_size).effective_batch_size == effective


def test_backoff_from_settings() -> None:
    settings = Settings(backoff_base=2.0, max_backoff_delay=40)

    assert settings.backoff == BackoffDelay(2.0, 40)


@pytest.mark.parametrize("field", ["workers", "batch_size", "expiration_batch_size", "max_attempts"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"], ids=["zero", "negative", "float", "bool", "string"])
def test_count_must_be_positive_int(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        Settings(**{field: value})


@pytest.mark.parametrize("field", ["process_time", "max_poll_interval", "min_poll_interval", "expiration_interval"])
@pytest.mark.parametrize(
    "value",
    [0, -1, timedelta(0), timedelta(seconds=-1), NAN, INF, -INF, True, MAX_DELAY.total_seconds() * 2],
    ids=["zero", "negative", "zero-td", "negative-td", "nan", "inf", "minus-inf", "bool", "too-long"],
)
def test_interval_must_be_positive(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        Settings(**{field: value})


@pytest.mark.parametrize("field", ["max_backoff_delay", "shutdown_grace_period"])
@pytest.mark.parametrize(
    "value",
    [-1, timedelta(seconds=-1), NAN, INF, True, MAX_DELAY + timedelta(days=1)],
    ids=["negative", "negative-td", "nan", "inf", "bool", "too-long"],
)
def test_duration_must_not_be_negative(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        Settings(**{field: value})


@pytest.mark.parametrize("field", ["max_backoff_delay", "shutdown_grace_period"])
def test_zero_duration_accepted(field: str) -> None:
    assert getattr(Settings(**{field: 0}), field) == timedelta(0)


@pytest.mark.parametrize("base", [0.99, 0, -1.5, NAN, INF], ids=["below-one", "zero", "negative", "nan", "inf"])
def test_backoff_base_rejected(base: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="backoff_base"):
        Settings(backoff_base=base)


def test_min_poll_above_max_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="min_poll_interval"):
        Settings(min_poll_interval=5, max_poll_interval=1)


def test_unknown_setting_rejected() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(worker=3)  # type: ignore[call-arg]


def test_settings_are_frozen() -> None:
    settings = Settings()

    with pytest.raises(pydantic.ValidationError):
        settings.workers = 9  # type: ignore[misc]


def test_kharon_rejects_other_settings_type() -> None:
    with pytest.raises(TypeError, match=r"kharon\.Settings"):
        Kharon(MemoryStore(), {"workers": 2})  # type: ignore[arg-type]
