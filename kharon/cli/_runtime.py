"""The runtime of `kharon serve` and `kharon worker`: store, router, signals, server.

Both commands run everything in one `trio.run` on one `Kharon` and one store.
The first SIGINT or SIGTERM starts a graceful shutdown: the HTTP server stops
accepting connections and finishes open requests, and the workers stop
leasing and give running handlers the grace period. A second signal cancels
everything at once.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from starlette.types import ASGIApp

from kharon._kharon import Kharon
from kharon._router import Router
from kharon.example import create_router
from kharon.stores import MemoryStore, SQLiteStore
from kharon.stores._protocol import Store

__all__ = [
    "MEMORY_DB",
    "AppTarget",
    "ForcedStop",
    "RouterLoadError",
    "build_router",
    "import_app",
    "is_loopback",
    "load_router",
    "open_store",
    "run_server",
    "run_workers_only",
]

logger = logging.getLogger("kharon.cli")

# `--db :memory:` keeps tickets in process memory, for demos; nothing persists.
MEMORY_DB = ":memory:"


class RouterLoadError(Exception):
    """`--app` does not name an importable Router."""


class ForcedStop(Exception):
    """A second signal arrived during the graceful shutdown."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


def open_store(db: str) -> Store:
    """Open the store at `db`: the SQLite file, or a memory store for ":memory:"."""
    if db == MEMORY_DB:
        return MemoryStore()
    return SQLiteStore(db)


# The target of `--app`: a router, or a factory that builds one from the Kharon instance.
AppTarget = Router | Callable[[Kharon], object]


def import_app(spec: str | None) -> AppTarget:
    """Import what `spec` ("module:attribute") names and check that it is a Router or a callable.

    None is the example router's factory. The current directory is importable,
    as it is for `python -m`. Nothing here needs the store, so `serve` and
    `worker` call this before they open the database.
    """
    if spec is None:
        return create_router
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RouterLoadError(f"--app must look like module:attribute (for example myapp.tasks:router), got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        raise RouterLoadError(f"cannot import module {module_name!r} for --app: {type(exc).__name__}: {exc}") from exc
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            message = f"module {module_name!r} has no attribute {attribute!r} (from --app {spec!r})"
            raise RouterLoadError(message) from None

    if isinstance(target, Router) or callable(target):
        return target
    raise RouterLoadError(
        f"--app {spec!r} is an object of type {type(target).__name__}; expected a kharon.Router "
        "or a callable that takes the Kharon instance and returns one"
    )


def build_router(target: AppTarget, spec: str | None, kharon: Kharon) -> Router:
    """Return the router `import_app` found, calling it with `kharon` if it is a factory."""
    if isinstance(target, Router):
        return target
    try:
        router = target(kharon)
    except Exception as exc:
        raise RouterLoadError(f"--app {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(router, Router):
        return router
    raise RouterLoadError(
        f"--app {spec!r} returned an object of type {type(router).__name__}; expected a kharon.Router"
    )


def load_router(spec: str | None, kharon: Kharon) -> Router:
    """Import the router named by `spec` ("module:attribute"); None is the example router.

    The attribute is either a `Router` or a callable that takes the `Kharon`
    instance and returns a `Router`.
    """
    return build_router(import_app(spec), spec, kharon)


def is_loopback(host: str) -> bool:
    """Return True when `host` is a loopback address or "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to any interface.
        return False


def _bind(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _watch_signals(
    kharon: Kharon,
    shutdown: trio.Event,
    forced: list[int],
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.is_set():
                logger.info("received %s: shutting down gracefully (send it again to stop at once)", name)
                shutdown.set()
            else:
                logger.warning("received %s again: stopping at once", name)
                forced.append(signum)
                # Handlers are shielded for the grace period; cut it short.
                kharon.cancel_handlers()
                everything.cancel()


async def _run_workers(
    kharon: Kharon, router: Router, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    with scope:
        await kharon.run(router, task_status=task_status)


async def run_server(
    kharon: Kharon,
    router: Router,
    app: ASGIApp,
    *,
    host: str,
    port: int,
    on_listening: Callable[[list[str]], None],
) -> None:
    """Run the workers and the HTTP server until a signal stops them.

    Raise `ForcedStop` when a second signal cut the graceful shutdown short.
    """
    config = Config()
    config.bind = [_bind(host, port)]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Open requests get as long to finish as running handlers do.
    config.graceful_timeout = kharon.settings.shutdown_grace_period.total_seconds()

    async def start_server(services: trio.Nursery, shutdown: trio.Event) -> None:
        server = partial(hypercorn_serve, cast(Any, app), config, shutdown_trigger=shutdown.wait)
        on_listening(await services.start(server))

    await _run_until_signal(kharon, router, start_server)


async def run_workers_only(kharon: Kharon, router: Router, *, on_started: Callable[[], None]) -> None:
    """Run the workers until a signal stops them; raise `ForcedStop` on a second signal."""

    async def announce(services: trio.Nursery, shutdown: trio.Event) -> None:
        on_started()

    await _run_until_signal(kharon, router, announce)


async def _run_until_signal(
    kharon: Kharon,
    router: Router,
    start_services: Callable[[trio.Nursery, trio.Event], Awaitable[None]],
) -> None:
    """Run the workers plus what `start_services` starts, until SIGINT or SIGTERM.

    `start_services` gets the services nursery and the shutdown event. The
    first signal sets that event and stops the workers' poller; a second one
    raises `ForcedStop` after cancelling everything at once.
    """
    shutdown = trio.Event()
    forced: list[int] = []
    async with trio.open_nursery() as everything:
        await everything.start(_watch_signals, kharon, shutdown, forced, everything.cancel_scope)
        async with trio.open_nursery() as services:
            workers = trio.CancelScope()
            await services.start(_run_workers, kharon, router, workers)
            await start_services(services, shutdown)
            await shutdown.wait()
            # Stopping the workers cancels only their poller: handlers get the grace period.
            workers.cancel()
        everything.cancel_scope.cancel()
    if forced:
        raise ForcedStop(forced[0])
