"""The `kharon` command: serve, worker, and one command per ticket operation.

Exit codes:

* 0: success
* 1: ticket not found
* 2: invalid usage or input
* 3: operation not allowed in the ticket's state, or its lease was lost
* 4: database or schema error
* 5: the server could not start, or failed
* 128 + N: a second signal N stopped `serve` or `worker` at once
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import click
import trio
from click.core import ParameterSource
from pydantic import ValidationError

from kharon import __version__
from kharon._errors import InvalidTransition, KharonError, LeaseLost, TicketNotFound, VersionConflict
from kharon._kharon import Kharon
from kharon._settings import Settings
from kharon._ticket import MAX_DELAY, NICE_MAX, NICE_MIN, Ticket
from kharon.cli._output import print_events, print_json, print_stats, print_ticket, stats_to_json
from kharon.cli._runtime import (
    MEMORY_DB,
    AppTarget,
    ForcedStop,
    RouterLoadError,
    build_router,
    import_app,
    is_loopback,
    open_store,
    run_server,
    run_workers_only,
)
from kharon.http import DEFAULT_MAX_BODY_SIZE, create_app
from kharon.http._app import check_token
from kharon.stores import Store
from kharon.stores import migrate as migrate_sqlite

__all__ = ["cli", "main"]

T = TypeVar("T")

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_CONFLICT = 3
EXIT_DATABASE = 4
EXIT_SERVER = 5

# Events written by these commands record this actor.
CLI_ACTOR = "cli"


class CommandError(click.ClickException):
    """A failure reported as one line on stderr with a specific exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        # click declares exit_code as a class attribute; each error sets its own.
        self.exit_code = exit_code  # type: ignore[misc]


def _error_message(error: Mapping[str, Any]) -> str:
    """Return a pydantic error's message without the "Value error, " prefix pydantic adds."""
    raised = error.get("ctx", {}).get("error")
    if error.get("type") in ("value_error", "assertion_error") and raised is not None:
        return str(raised)
    return str(error["msg"])


def _one_line(exc: ValidationError, names: Mapping[str, str] | None = None) -> str:
    """Join the errors of `exc` into one line; `names` maps a field to the option that sets it."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc and names is not None and loc[0] in names:
            loc[0] = names[loc[0]]
        location = ".".join(loc)
        message = _error_message(error)
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def _leaf(exc: BaseException) -> BaseException:
    """Return the one exception inside nested exception groups, or `exc` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def _errors_as_exit_codes() -> Iterator[None]:
    """Turn Kharon and database errors into one-line messages with the documented exit code."""
    try:
        yield
    except click.ClickException:
        raise
    except BaseException as raised:
        exc = _leaf(raised)
        if isinstance(exc, TicketNotFound):
            raise CommandError(str(exc), EXIT_NOT_FOUND) from None
        if isinstance(exc, (InvalidTransition, LeaseLost, VersionConflict)):
            raise CommandError(str(exc), EXIT_CONFLICT) from None
        if isinstance(exc, KharonError):
            raise CommandError(str(exc), EXIT_DATABASE) from None
        if isinstance(exc, sqlite3.Error):
            raise CommandError(f"database error: {exc}", EXIT_DATABASE) from None
        if isinstance(exc, ValidationError):
            raise CommandError(f"invalid input: {_one_line(exc)}", EXIT_USAGE) from None
        if isinstance(exc, ValueError):
            raise CommandError(f"invalid input: {exc}", EXIT_USAGE) from None
        raise


def _open(db: str) -> Store:
    with _errors_as_exit_codes():
        try:
            return open_store(db)
        except OSError as exc:
            raise CommandError(f"cannot open database {db!r}: {exc}", EXIT_DATABASE) from None


def _open_for_command(db: str, *, create: bool) -> Store:
    """Open the database file of a ticket command; without `create`, the file must exist."""
    if db == MEMORY_DB:
        raise CommandError(
            f"--db {MEMORY_DB} is for serve and worker only, because this command would start "
            "with no tickets and lose its changes on exit. Pass the database file that serve or worker uses",
            EXIT_USAGE,
        )
    # NOTE: a file removed between this check and the open is created again,
    # because SQLiteStore creates a missing file.
    if not create and not os.path.exists(db):
        raise CommandError(
            f"database file {db} does not exist; create it with `kharon migrate --db {shlex.quote(db)}` "
            "or `kharon serve`",
            EXIT_DATABASE,
        )
    return _open(db)


def _run(db: str, operation: Callable[[Kharon], Awaitable[T]], *, create: bool = False) -> T:
    """Open the store, run `operation` in one `trio.run`, close the store.

    Without `create`, a missing database file is an error instead of a new, empty database.
    """
    store = _open_for_command(db, create=create)

    async def run() -> T:
        async with Kharon(store, actor=CLI_ACTOR) as kharon:
            return await operation(kharon)

    with _errors_as_exit_codes():
        return trio.run(run)


class Seconds(click.ParamType[timedelta]):
    """A finite number of seconds, as a `timedelta`: 0 or more, or more than 0 when `positive`.

    The maximum is `MAX_DELAY`, which both tickets and `Settings` accept.
    """

    name = "seconds"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive
        self.range = "more than 0" if positive else "0 or more"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            seconds = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        maximum = MAX_DELAY.total_seconds()
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if seconds < 0 or (self.positive and seconds == 0):
            self.fail(f"{value} seconds is out of range: it must be {self.range}", param, ctx)
        if seconds > maximum:
            message = f"{value} seconds is longer than the maximum of {maximum:.0f} ({MAX_DELAY.days} days)"
            self.fail(message, param, ctx)
        delta = timedelta(seconds=seconds)
        if self.positive and delta == timedelta(0):
            message = f"{value} seconds rounds to 0, but it must be more than 0 (the unit is 1 microsecond)"
            self.fail(message, param, ctx)
        return delta


class JSONValue(click.ParamType[Any]):
    """A JSON document; NaN and the infinities are rejected, as JSON has no spelling for them."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        def reject(constant: str) -> Any:
            raise ValueError(f"{constant} is not valid JSON")

        try:
            return json.loads(value, parse_constant=reject)
        except (ValueError, RecursionError) as exc:
            self.fail(f"invalid JSON {value!r:.80}: {exc}", param, ctx)


SECONDS = Seconds()
POSITIVE_SECONDS = Seconds(positive=True)

DEFAULT_DB = "kharon.db"


def _choose_db(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Pick the database: the subcommand's --db, else the group's --db, else KHARON_DB, else the default."""
    if ctx.get_parameter_source("db") is ParameterSource.COMMANDLINE:
        return value
    group = ctx.parent
    if group is not None and group.get_parameter_source("db") is ParameterSource.COMMANDLINE:
        return str(group.params["db"])
    return value


db_option = click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="KHARON_DB",
    show_default=True,
    show_envvar=True,
    callback=_choose_db,
    help=f"SQLite database file; {MEMORY_DB} keeps tickets in memory (serve and worker only). Overrides `kharon --db`.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kharon")
@click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="KHARON_DB",
    show_default=True,
    show_envvar=True,
    help="SQLite database file of every subcommand, unless the subcommand gets its own --db.",
)
def cli(db: str) -> None:
    """Durable, delayed tickets: run the workers and HTTP API, or operate on tickets."""


# -- long-running commands ---------------------------------------------------


def _settings_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--workers", type=click.IntRange(min=1), help="Handlers that run at once [default: 4]."),
        click.option(
            "--process-time",
            type=POSITIVE_SECONDS,
            help="Seconds a handler may run before its ticket is leased again, more than 0 [default: 30].",
        ),
        click.option(
            "--backoff-base",
            type=click.FloatRange(min=1.0),
            help="Base of the retry backoff, a finite number of 1 or more [default: 1.5].",
        ),
        click.option(
            "--max-backoff-delay",
            type=SECONDS,
            help="Maximum retry backoff, in seconds, 0 or more. "
            "The example router's backoff tickets use it too [default: 15].",
        ),
        click.option(
            "--grace-period",
            type=SECONDS,
            help="Seconds running handlers and open requests get to finish on shutdown, 0 or more [default: 10].",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            default="info",
            show_default=True,
            help="Lowest level logged to stderr; debug also logs every HTTP request.",
        ),
        click.option(
            "--app",
            "app_spec",
            metavar="MODULE:ATTRIBUTE",
            help="Router to run: a kharon.Router, or a callable that takes the Kharon instance and returns one. "
            "Default: the built-in example router (kharon.example).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _settings(
    workers: int | None,
    process_time: timedelta | None,
    backoff_base: float | None,
    max_backoff_delay: timedelta | None,
    grace_period: timedelta | None,
) -> Settings:
    values = {
        "workers": workers,
        "process_time": process_time,
        "backoff_base": backoff_base,
        "max_backoff_delay": max_backoff_delay,
        "shutdown_grace_period": grace_period,
    }
    try:
        return Settings(**{name: value for name, value in values.items() if value is not None})
    except ValidationError as exc:
        raise CommandError(f"invalid settings: {_one_line(exc, _SETTING_OPTIONS)}", EXIT_USAGE) from None


# The option that sets each setting, to name it in error messages.
_SETTING_OPTIONS = {
    "workers": "--workers",
    "process_time": "--process-time",
    "backoff_base": "--backoff-base",
    "max_backoff_delay": "--max-backoff-delay",
    "shutdown_grace_period": "--grace-period",
}


def _configure_logging(level_name: str) -> None:
    level = getattr(logging, level_name.upper())
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Hypercorn's "Running on" line repeats the line `serve` prints.
    logging.getLogger("hypercorn.error").setLevel(max(level, logging.WARNING))


def _import_app(app_spec: str | None) -> AppTarget:
    """Import `--app` before the store is opened, so a bad --app leaves no new database file."""
    try:
        return import_app(app_spec)
    except RouterLoadError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _prepare(db: str, app_spec: str | None, target: AppTarget, settings: Settings) -> tuple[Kharon, Any]:
    store = _open(db)
    kharon = Kharon(store, settings)
    try:
        # NOTE: a factory runs only now, because it takes the Kharon instance,
        # so a factory that raises has already created a missing database file.
        router = build_router(target, app_spec, kharon)
    except RouterLoadError as exc:
        trio.run(kharon.close)
        raise CommandError(str(exc), EXIT_USAGE) from None
    return kharon, router


def _run_service(kharon: Kharon, service: Callable[[], Awaitable[None]]) -> None:
    async def run() -> None:
        try:
            await service()
        finally:
            with trio.CancelScope(shield=True):
                await kharon.close()

    with _errors_as_exit_codes():
        try:
            trio.run(run)
        except BaseException as raised:
            exc = _leaf(raised)
            if isinstance(exc, ForcedStop):
                raise CommandError(str(exc), 128 + exc.signum) from None
            if isinstance(exc, OSError):
                raise CommandError(f"the server failed: {exc}", EXIT_SERVER) from None
            raise


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port; 0 picks one.")
@click.option(
    "--token",
    envvar="KHARON_API_TOKEN",
    show_envvar=True,
    help="Bearer token every request except /healthz must send. Required unless --host is a loopback address.",
)
@click.option(
    "--max-body-size",
    type=click.IntRange(min=0),
    default=DEFAULT_MAX_BODY_SIZE,
    show_default=True,
    help="Largest request body accepted, in bytes; larger bodies get 413.",
)
@_settings_options
def serve(
    db: str,
    host: str,
    port: int,
    token: str | None,
    max_body_size: int,
    workers: int | None,
    process_time: timedelta | None,
    backoff_base: float | None,
    max_backoff_delay: timedelta | None,
    grace_period: timedelta | None,
    log_level: str,
    app_spec: str | None,
) -> None:
    """Run the workers and the HTTP API in one process, until SIGINT or SIGTERM."""
    token = token or None
    if token is None and not is_loopback(host):
        raise CommandError(
            f"will not listen on {host!r} without a token, because anyone who can reach it could change tickets. "
            "Pass --token (or set KHARON_API_TOKEN), or listen on 127.0.0.1",
            EXIT_USAGE,
        )
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
    settings = _settings(workers, process_time, backoff_base, max_backoff_delay, grace_period)
    target = _import_app(app_spec)
    _configure_logging(log_level)
    kharon, router = _prepare(db, app_spec, target, settings)
    try:
        app = create_app(kharon, token=token, max_body_size=max_body_size)
    except ValueError as exc:
        trio.run(kharon.close)
        raise CommandError(str(exc), EXIT_USAGE) from None

    def announce(binds: list[str]) -> None:
        auth = "token required" if token else "no token"
        click.echo(
            f"kharon serve: listening on {', '.join(binds)} ({auth}), database {db}, "
            f"{settings.workers} workers, router {app_spec or 'kharon.example (built-in)'}"
        )

    _run_service(kharon, lambda: run_server(kharon, router, app, host=host, port=port, on_listening=announce))


@cli.command()
@db_option
@_settings_options
def worker(
    db: str,
    workers: int | None,
    process_time: timedelta | None,
    backoff_base: float | None,
    max_backoff_delay: timedelta | None,
    grace_period: timedelta | None,
    log_level: str,
    app_spec: str | None,
) -> None:
    """Run the workers only, until SIGINT or SIGTERM."""
    settings = _settings(workers, process_time, backoff_base, max_backoff_delay, grace_period)
    target = _import_app(app_spec)
    _configure_logging(log_level)
    kharon, router = _prepare(db, app_spec, target, settings)

    def announce() -> None:
        click.echo(
            f"kharon worker: database {db}, {settings.workers} workers, "
            f"router {app_spec or 'kharon.example (built-in)'}"
        )

    _run_service(kharon, lambda: run_workers_only(kharon, router, on_started=announce))


# -- ticket commands -----------------------------------------------------------


@cli.command()
@click.argument("ticket_type", metavar="TYPE")
@click.option("--id", "ticket_id", help="Ticket id; a new UUIDv7 when omitted. An existing ticket starts over.")
@click.option("--payload", type=JSONValue(), help="Payload as JSON, for example '{\"user\": 7}' [default: null].")
@click.option("--nice", type=click.IntRange(NICE_MIN, NICE_MAX), default=0, show_default=True, help="Lower runs first.")
@click.option("--delay", type=SECONDS, help="Seconds until the ticket is due, 0 or more [default: due at once].")
@db_option
@json_option
def put(
    ticket_type: str,
    ticket_id: str | None,
    payload: Any,
    nice: int,
    delay: timedelta | None,
    db: str,
    as_json: bool,
) -> None:
    """Put a ticket of TYPE as pending."""
    fields: dict[str, Any] = {"type": ticket_type, "payload": payload, "nice": nice}
    if ticket_id is not None:
        fields["id"] = ticket_id
    with _errors_as_exit_codes():
        ticket = Ticket(**fields)
    stored = _run(db, lambda kharon: kharon.put(ticket, delay=delay), create=True)
    _show_ticket(stored, as_json)


@cli.command()
@click.argument("ticket_id", metavar="ID")
@db_option
@json_option
def get(ticket_id: str, db: str, as_json: bool) -> None:
    """Show a ticket."""
    _show_ticket(_run(db, lambda kharon: kharon.get(ticket_id)), as_json)


@cli.command()
@click.argument("ticket_id", metavar="ID")
@db_option
@json_option
def history(ticket_id: str, db: str, as_json: bool) -> None:
    """Show every event of a ticket, also after it was removed."""
    events = _run(db, lambda kharon: kharon.history(ticket_id))
    if not events:
        raise CommandError(f"ticket {ticket_id!r} not found: it has no history", EXIT_NOT_FOUND)
    if as_json:
        print_json(events)
    else:
        print_events(ticket_id, events)


@cli.command()
@click.argument("ticket_id", metavar="ID")
@click.option("--keep", is_flag=True, help="Keep the ticket as cancelled instead of removing it.")
@click.option("--reason", default="cancelled via cli", show_default=True, help="Error reason recorded in the event.")
@db_option
@json_option
def cancel(ticket_id: str, keep: bool, reason: str, db: str, as_json: bool) -> None:
    """Cancel a pending or running ticket."""
    ticket = _run(db, lambda kharon: kharon.cancel(ticket_id, keep=keep, error_reason=reason))
    if ticket is not None:
        _show_ticket(ticket, as_json)
    elif as_json:
        print_json({"id": ticket_id, "removed": True})
    else:
        click.echo(f"cancelled and removed ticket {ticket_id}")


@cli.command()
@click.argument("ticket_id", metavar="ID")
@click.option(
    "--delay", type=SECONDS, default="0", show_default=True, help="Seconds until the ticket is due again, 0 or more."
)
@db_option
@json_option
def retry(ticket_id: str, delay: timedelta, db: str, as_json: bool) -> None:
    """Make a pending or running ticket due again."""
    ticket = _run(db, lambda kharon: kharon.retry(ticket_id, delay=delay))
    assert ticket is not None
    _show_ticket(ticket, as_json)


@cli.command()
@click.argument("ticket_id", metavar="ID")
@db_option
def delete(ticket_id: str, db: str) -> None:
    """Remove a ticket in any state; exit 1 when it does not exist."""
    if not _run(db, lambda kharon: kharon.delete(ticket_id)):
        raise CommandError(f"ticket {ticket_id!r} not found", EXIT_NOT_FOUND)
    click.echo(f"deleted ticket {ticket_id}")


@cli.command()
@db_option
@json_option
def stats(db: str, as_json: bool) -> None:
    """Count tickets by status and type, and events by kind."""
    result = _run(db, lambda kharon: kharon.stats())
    if as_json:
        print_json(stats_to_json(result))
    else:
        print_stats(result)


@cli.command()
@db_option
def migrate(db: str) -> None:
    """Create the database, or bring its schema up to date."""
    if db == MEMORY_DB:
        raise CommandError(f"{MEMORY_DB} has no schema to migrate; pass a database file", EXIT_USAGE)
    with _errors_as_exit_codes():
        try:
            version = migrate_sqlite(db)
        except OSError as exc:
            raise CommandError(f"cannot open database {db!r}: {exc}", EXIT_DATABASE) from None
    click.echo(f"database {db} is at schema version {version}")


def _show_ticket(ticket: Ticket, as_json: bool) -> None:
    if as_json:
        print_json(ticket)
    else:
        print_ticket(ticket)


def main() -> None:
    """Run the `kharon` command (the console-script entry point)."""
    cli(prog_name="kharon")
