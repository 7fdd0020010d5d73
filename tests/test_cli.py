"""The `kharon` command, run with click's CliRunner on a temporary SQLite file."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from kharon import Kharon, Router
from kharon.cli import cli
from kharon.cli._main import POSITIVE_SECONDS, SECONDS, CommandError, _settings
from kharon.cli._runtime import RouterLoadError, is_loopback, load_router
from kharon.stores import MemoryStore


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "kharon.db")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_failed(result: Result, exit_code: int, *fragments: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


# -- migrate ---------------------------------------------------------------------


def test_migrate_creates_database(db: str) -> None:
    first = run("migrate", "--db", db)
    second = run("migrate", "--db", db)

    assert first.exit_code == 0, first.output
    assert "schema version 1" in first.stdout
    assert second.exit_code == 0
    assert second.stdout == first.stdout


def test_migrate_memory_is_usage_error() -> None:
    assert_failed(run("migrate", "--db", ":memory:"), 2, "no schema")


# -- put, get ------------------------------------------------------------------------


def test_put_then_get(db: str) -> None:
    put = run_json("put", "email", "--id", "t1", "--payload", '{"to": "a@example.com"}', "--nice", "-2", "--db", db)
    got = run_json("get", "t1", "--db", db)

    assert put["id"] == "t1"
    assert got["type"] == "email"
    assert got["payload"] == {"to": "a@example.com"}
    assert got["nice"] == -2
    assert got["status"] == "pending"


def test_put_generates_id(db: str) -> None:
    put = run_json("put", "email", "--db", db)

    assert len(put["id"]) == 36
    assert put["payload"] is None


def test_put_delay_sets_runat(db: str) -> None:
    put = run_json("put", "email", "--delay", "300", "--db", db)

    assert datetime.fromisoformat(put["runat"]) > datetime.now(UTC) + timedelta(seconds=290)


def test_put_prints_table(db: str) -> None:
    result = run("put", "email", "--id", "t1", "--db", db)

    assert result.exit_code == 0
    assert "t1" in result.stdout
    assert "pending" in result.stdout


def test_get_table(db: str) -> None:
    run("put", "email", "--id", "t1", "--payload", "[1, 2]", "--db", db)

    result = run("get", "t1", "--db", db)

    assert result.exit_code == 0
    assert "[1,2]" in result.stdout
    assert "email" in result.stdout


def test_get_missing_exits_1(db: str) -> None:
    run("migrate", "--db", db)

    result = run("get", "nope", "--db", db)

    assert_failed(result, 1, "'nope' not found")
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_from_environment(db: str) -> None:
    run("put", "email", "--id", "t1", env={"KHARON_DB": db})

    result = run("get", "t1", "--db", db)

    assert result.exit_code == 0


def test_db_on_group(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)

    history = run("--db", db, "history", "t1")
    got = run("--db", db, "get", "t1", "--json")

    assert history.exit_code == 0, history.output
    assert "put" in history.stdout
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["id"] == "t1"


def test_db_on_subcommand_wins(db: str, tmp_path: Path) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    elsewhere = tmp_path / "elsewhere.db"

    result = run("--db", str(elsewhere), "get", "t1", "--db", db)

    assert result.exit_code == 0, result.output
    assert not elsewhere.exists()


def test_db_on_group_wins_over_environment(db: str, tmp_path: Path) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    elsewhere = tmp_path / "elsewhere.db"

    result = run("--db", db, "get", "t1", env={"KHARON_DB": str(elsewhere)})

    assert result.exit_code == 0, result.output
    assert not elsewhere.exists()


def test_group_db_in_help() -> None:
    result = run("--help")

    assert "--db" in result.stdout
    assert "KHARON_DB" in result.stdout


# -- a database file that does not exist -------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["get", "t1"], ["history", "t1"], ["stats"], ["cancel", "t1"], ["retry", "t1"], ["delete", "t1"]],
)
def test_missing_file_exits_4_and_creates_nothing(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "typo.db"

    result = run(*args, "--db", str(path))

    assert_failed(result, 4)
    assert result.stderr == (
        f"Error: database file {path} does not exist; create it with `kharon migrate --db {path}` or `kharon serve`\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_missing_file_hint_quotes_path(tmp_path: Path) -> None:
    path = tmp_path / "my tickets.db"

    result = run("stats", "--db", str(path))

    assert_failed(result, 4, f"`kharon migrate --db '{path}'`")


@pytest.mark.parametrize("args", [["get", "t1"], ["stats"], ["delete", "t1"], ["put", "email"]])
def test_ticket_commands_reject_memory_db(args: list[str]) -> None:
    result = run(*args, "--db", ":memory:")

    assert_failed(result, 2, "serve and worker only")


def test_put_creates_missing_file(db: str) -> None:
    result = run("put", "email", "--id", "t1", "--db", db)

    assert result.exit_code == 0, result.output
    assert Path(db).exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--payload", '{"a": NaN}'], "NaN is not valid JSON"),
        (["--payload", "{oops"], "invalid JSON"),
        (["--nice", "99999999999"], "--nice"),
        (["--delay", "-1"], "--delay"),
        (["--delay", "nan"], "--delay"),
        (["--delay", "inf"], "--delay"),
        (["--delay", "later"], "not a number"),
        (["--id", "bad\x07id"], "control character"),
        (["--id", ""], "must not be empty"),
    ],
)
def test_put_invalid_input_exits_2(db: str, args: list[str], fragment: str) -> None:
    result = run("put", "email", *args, "--db", db)

    assert_failed(result, 2, fragment)
    assert "Value error" not in result.stderr


# -- history ---------------------------------------------------------------------------


def test_history_table(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    run("cancel", "t1", "--keep", "--db", db)
    run("delete", "t1", "--db", db)

    result = run("history", "t1", "--db", db)

    assert result.exit_code == 0, result.output
    for text in ["put", "cancel", "delete", "(none) → pending", "pending → cancelled", "cancelled → (removed)", "cli"]:
        assert text in result.stdout
    assert 'error_reason: "cancelled via cli"' in result.stdout


def test_history_json(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    run("retry", "t1", "--delay", "5", "--db", db)

    events = run_json("history", "t1", "--db", db)

    assert [event["kind"] for event in events] == ["put", "retry"]
    assert [event["seq"] for event in events] == [1, 2]
    assert events[1]["status_before"] == "pending"
    assert events[1]["status_after"] == "pending"


def test_history_missing_exits_1(db: str) -> None:
    run("migrate", "--db", db)

    assert_failed(run("history", "nope", "--db", db), 1, "'nope' not found")


# -- cancel, retry, delete ----------------------------------------------------------------


def test_cancel_removes(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)

    result = run("cancel", "t1", "--db", db)

    assert result.exit_code == 0
    assert "cancelled and removed ticket t1" in result.stdout
    assert run("get", "t1", "--db", db).exit_code == 1


def test_cancel_keep_with_reason(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)

    ticket = run_json("cancel", "t1", "--keep", "--reason", "no longer needed", "--db", db)

    assert ticket["status"] == "cancelled"
    assert ticket["error_reason"] == "no longer needed"


def test_cancel_twice_exits_3(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    run("cancel", "t1", "--keep", "--db", db)

    result = run("cancel", "t1", "--db", db)

    assert_failed(result, 3, "'cancel' is not allowed for ticket 't1' in state 'cancelled'", "delete, expire, put")


def test_cancel_missing_exits_1(db: str) -> None:
    run("migrate", "--db", db)

    assert_failed(run("cancel", "nope", "--db", db), 1, "'nope' not found")


def test_retry_sets_runat(db: str) -> None:
    run("put", "email", "--id", "t1", "--delay", "3600", "--db", db)

    ticket = run_json("retry", "t1", "--db", db)
    later = run_json("retry", "t1", "--delay", "120", "--db", db)

    assert datetime.fromisoformat(ticket["runat"]) < datetime.now(UTC) + timedelta(seconds=5)
    assert datetime.fromisoformat(later["runat"]) > datetime.now(UTC) + timedelta(seconds=100)
    assert later["status"] == "pending"


def test_retry_cancelled_exits_3(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)
    run("cancel", "t1", "--keep", "--db", db)

    assert_failed(run("retry", "t1", "--db", db), 3, "'retry' is not allowed")


def test_retry_missing_exits_1(db: str) -> None:
    run("migrate", "--db", db)

    assert_failed(run("retry", "nope", "--db", db), 1, "'nope' not found")


def test_delete_then_missing(db: str) -> None:
    run("put", "email", "--id", "t1", "--db", db)

    first = run("delete", "t1", "--db", db)
    second = run("delete", "t1", "--db", db)

    assert first.exit_code == 0
    assert "deleted ticket t1" in first.stdout
    assert_failed(second, 1, "'t1' not found")


# -- stats ---------------------------------------------------------------------------------


def test_stats_json(db: str) -> None:
    run("put", "email", "--id", "a", "--db", db)
    run("put", "sms", "--id", "b", "--db", db)
    run("cancel", "b", "--keep", "--db", db)

    stats = run_json("stats", "--db", db)

    assert stats["total"] == 2
    assert stats["by_status"]["pending"] == 1
    assert stats["by_status"]["cancelled"] == 1
    assert stats["by_type"] == {"email": {"pending": 1}, "sms": {"cancelled": 1}}
    assert stats["events_by_kind"] == {"put": 2, "cancel": 1}


def test_stats_table(db: str) -> None:
    run("put", "email", "--id", "a", "--db", db)

    result = run("stats", "--db", db)

    assert result.exit_code == 0
    assert "tickets by status" in result.stdout
    assert "email" in result.stdout
    assert "events in the log: 1" in result.stdout


# -- databases that are not Kharon's ------------------------------------------------------------


def test_garbage_file_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)

    result = run("get", "t1", "--db", str(path))

    assert_failed(result, 4, "notes.db")
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_text().startswith("these are my notes")


def test_foreign_sqlite_database_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")

    for args in (["stats"], ["migrate"], ["put", "email"]):
        result = run(*args, "--db", str(path))

        assert_failed(result, 4, "other.db")


def test_missing_directory_exits_4(tmp_path: Path) -> None:
    result = run("stats", "--db", str(tmp_path / "no" / "such" / "dir" / "kharon.db"))

    assert_failed(result, 4, "does not exist")


def test_put_in_missing_directory_exits_4(tmp_path: Path) -> None:
    result = run("put", "email", "--db", str(tmp_path / "no" / "such" / "dir" / "kharon.db"))

    assert_failed(result, 4)


# -- serve and worker checks that run before anything starts ------------------------------------


def test_serve_public_host_without_token_exits_2(db: str) -> None:
    result = run("serve", "--host", "0.0.0.0", "--db", db, env={"KHARON_API_TOKEN": ""})

    assert_failed(result, 2, "without a token", "--token")
    assert not Path(db).exists()


def test_serve_bad_app_exits_2(db: str) -> None:
    result = run("serve", "--app", "no_such_module_here:router", "--db", db)

    assert_failed(result, 2, "cannot import module 'no_such_module_here'")
    assert not Path(db).exists()


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize(
    ("attribute", "fragment"), [("number", "is an object of type int"), ("missing", "has no attribute 'missing'")]
)
def test_bad_app_creates_no_database(app_module: str, db: str, command: str, attribute: str, fragment: str) -> None:
    result = run(command, "--app", f"{app_module}:{attribute}", "--db", db)

    assert_failed(result, 2, fragment)
    assert not Path(db).exists()


def test_serve_bad_token_creates_no_database(db: str) -> None:
    result = run("serve", "--token", "has space", "--db", db)

    assert_failed(result, 2, "API token")
    assert "has space" not in result.stderr
    assert not Path(db).exists()


def test_serve_invalid_settings_exits_2(db: str) -> None:
    result = run("serve", "--workers", "0", "--db", db)

    assert_failed(result, 2, "--workers")


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--process-time", "0", "it must be more than 0"),
        ("--process-time", "-3", "it must be more than 0"),
        ("--process-time", "1e-9", "rounds to 0"),
        ("--process-time", "nan", "not a finite number"),
        ("--grace-period", "-1", "it must be 0 or more"),
        ("--max-backoff-delay", "-1", "it must be 0 or more"),
        ("--max-backoff-delay", "1e300", "maximum of 3153600000 (36500 days)"),
    ],
)
def test_worker_duration_out_of_range_exits_2(db: str, option: str, value: str, fragment: str) -> None:
    result = run("worker", option, value, "--db", db)

    assert_failed(result, 2, f"Invalid value for '{option}'", fragment)
    assert "Value error" not in result.stderr
    assert not Path(db).exists()


def test_worker_help_states_ranges() -> None:
    help_text = " ".join(run("worker", "--help").stdout.split())

    assert "leased again, more than 0" in help_text
    assert "shutdown, 0 or more" in help_text
    assert "in seconds, 0 or more" in help_text


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("0.5", 0.5), ("3153600000", 3153600000.0)])
def test_seconds_accepts_zero_or_more(text: str, seconds: float) -> None:
    assert SECONDS.convert(text, None, None) == timedelta(seconds=seconds)


def test_positive_seconds_rejects_zero() -> None:
    assert POSITIVE_SECONDS.convert("0.001", None, None) == timedelta(milliseconds=1)
    with pytest.raises(click.BadParameter, match="more than 0"):
        POSITIVE_SECONDS.convert("0", None, None)


def test_settings_error_names_option_without_prefix() -> None:
    with pytest.raises(CommandError) as raised:
        _settings(None, timedelta(0), None, None, None)

    assert str(raised.value) == "invalid settings: --process-time: must be positive, got 0.0 s"


def test_serve_infinite_backoff_base_exits_2(db: str) -> None:
    result = run("serve", "--backoff-base", "inf", "--db", db)

    assert_failed(result, 2, "invalid settings: --backoff-base: Input should be a finite number")


def test_worker_bad_app_exits_2(db: str) -> None:
    result = run("worker", "--app", "nocolon", "--db", db)

    assert_failed(result, 2, "module:attribute")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- --app loading -----------------------------------------------------------------------------------


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    source = """
from kharon import Router

router = Router()

@router.route("job")
async def job(ticket):
    pass

def build(kharon):
    built = Router()
    built.handle("built", job)
    return built

def not_a_router(kharon):
    return 42

number = 7
"""
    (tmp_path / "kharon_test_app.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "kharon_test_app"
    sys.modules.pop("kharon_test_app", None)


def test_load_router_instance(app_module: str) -> None:
    router = load_router(f"{app_module}:router", Kharon(MemoryStore()))

    assert isinstance(router, Router)
    assert router.types == ["job"]


def test_load_router_factory(app_module: str) -> None:
    router = load_router(f"{app_module}:build", Kharon(MemoryStore()))

    assert router.types == ["built"]


def test_load_router_default_is_example() -> None:
    router = load_router(None, Kharon(MemoryStore()))

    assert router.types == ["ack", "backoff", "cancel", "done", "fail"]


@pytest.mark.parametrize(
    ("attribute", "fragment"),
    [
        ("not_a_router", "returned an object of type int"),
        ("number", "is an object of type int"),
        ("missing", "has no attribute 'missing'"),
    ],
)
def test_load_router_rejects(app_module: str, attribute: str, fragment: str) -> None:
    with pytest.raises(RouterLoadError, match=fragment):
        load_router(f"{app_module}:{attribute}", Kharon(MemoryStore()))
