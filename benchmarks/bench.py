"""Throughput, wake-up latency and memory of Kharon on one machine.

Run:  python benchmarks/bench.py [--store sqlite|memory] [--tickets 20000]
                                 [--only SECTION ...] [--json]

Every figure is measured with the real clock in one process, on a fresh
database file in a temporary directory. Nothing here is asserted by a test;
the figures go to docs/benchmarks.md with the machine they came from.

Besides tickets per second, the end-to-end and store sections report CPU time
per ticket: `time.process_time` summed over every thread of the process (the
event loop and the store's writer thread). Both threads share the GIL, so
this sum, not the time of either thread, bounds the throughput. It is also
less disturbed than wall time when other processes share the CPU.

The `store` section calls the store directly with the commands `Kharon`
would build (put in batches of 1000, lease 64 at a time, ack from 64
concurrent tasks), without the worker runtime. The difference between it and
the end-to-end figure is the cost of the facade and the worker tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from kharon import Kharon, Router, Settings, Ticket
from kharon._commands import LeaseCommand, PutCommand, SettleCommand, SettleOperation
from kharon.stores import MemoryStore, Store

SECTIONS = ("put", "end-to-end", "store", "wakeup")


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo (Linux), or else what `platform.processor` returns."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def open_store(kind: str, directory: Path, name: str) -> Store:
    if kind == "memory":
        return MemoryStore()
    from kharon.stores import SQLiteStore

    return SQLiteStore(directory / f"{name}.db")


@contextlib.asynccontextmanager
async def kharon_on(kind: str, directory: Path, name: str, settings: Settings | None = None) -> AsyncIterator[Kharon]:
    async with Kharon(open_store(kind, directory, name), settings) as kharon:
        yield kharon


async def bench_put_sequential(kind: str, directory: Path, count: int) -> float:
    """Measure one caller awaiting each put: the latency-bound case."""
    async with kharon_on(kind, directory, "put-sequential") as kharon:
        started = time.perf_counter()
        for i in range(count):
            await kharon.put(Ticket(id=f"t{i}", type="noop", payload={"n": i}))
        return count / (time.perf_counter() - started)


async def bench_put_concurrent(kind: str, directory: Path, count: int, callers: int = 64) -> float:
    """Measure many tasks putting at once, so the store can group-commit their writes."""
    async with kharon_on(kind, directory, "put-concurrent") as kharon:

        async def caller(offset: int) -> None:
            for i in range(offset, count, callers):
                await kharon.put(Ticket(id=f"t{i}", type="noop", payload={"n": i}))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for offset in range(callers):
                nursery.start_soon(caller, offset)
        return count / (time.perf_counter() - started)


async def bench_put_many(kind: str, directory: Path, count: int, batch: int = 1000) -> float:
    async with kharon_on(kind, directory, "put-many") as kharon:
        started = time.perf_counter()
        for start in range(0, count, batch):
            await kharon.put_many(
                Ticket(id=f"t{i}", type="noop", payload={"n": i}) for i in range(start, min(start + batch, count))
            )
        return count / (time.perf_counter() - started)


async def bench_end_to_end(kind: str, directory: Path, count: int, settings: Settings) -> tuple[float, float]:
    """Pre-queue `count` no-op tickets, then time the workers until all are acked.

    Return tickets per second and microseconds of CPU time per ticket.
    """
    async with kharon_on(kind, directory, f"e2e-{settings.workers}", settings) as kharon:
        for start in range(0, count, 1000):
            await kharon.put_many(Ticket(id=f"t{i}", type="noop") for i in range(start, min(start + 1000, count)))
        remaining = count
        finished = trio.Event()
        router = Router()

        @router.route("noop")
        async def noop(ticket: Ticket) -> None:
            nonlocal remaining
            await kharon.ack(ticket.id)
            remaining -= 1
            if remaining == 0:
                finished.set()

        started = time.perf_counter()
        cpu_started = time.process_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            await finished.wait()
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            nursery.cancel_scope.cancel()
        return count / elapsed, cpu / count * 1e6


async def bench_store(kind: str, directory: Path, count: int) -> dict[str, tuple[float, float]]:
    """Put, lease and ack `count` tickets through the store alone, phase by phase.

    Return, for each phase, tickets per second and microseconds of CPU time per ticket.
    """
    figures: dict[str, tuple[float, float]] = {}
    settings = Settings()

    async def timed(phase: str, work: Callable[[], Awaitable[None]]) -> None:
        started = time.perf_counter()
        cpu_started = time.process_time()
        await work()
        elapsed = time.perf_counter() - started
        figures[phase] = (count / elapsed, (time.process_time() - cpu_started) / count * 1e6)

    async with open_store(kind, directory, "store") as store:
        now = datetime.now(UTC)
        leased: list[Ticket] = []

        async def put() -> None:
            for start in range(0, count, 1000):
                commands = [
                    PutCommand(Ticket(id=f"t{i}", type="noop"), now, "bench")
                    for i in range(start, min(start + 1000, count))
                ]
                await store.put(commands)

        async def lease() -> None:
            command = LeaseCommand(
                limit=64,
                now=now + timedelta(seconds=1),
                process_time=settings.process_time,
                backoff=settings.backoff,
                actor="bench",
            )
            while True:
                result = await store.lease(command)
                leased.extend(result.tickets)
                if len(result.tickets) < command.limit:
                    return

        async def ack() -> None:
            async def caller(offset: int) -> None:
                for ticket in leased[offset::64]:
                    assert ticket.lease_version is not None
                    command = SettleCommand(
                        operation=SettleOperation.ACK,
                        ticket_id=ticket.id,
                        now=now + timedelta(seconds=2),
                        actor="bench",
                        lease=ticket.attempts,
                        lease_version=ticket.lease_version,
                    )
                    await store.settle(command)

            async with trio.open_nursery() as nursery:
                for offset in range(64):
                    nursery.start_soon(caller, offset)

        await timed("put", put)
        await timed("lease", lease)
        if len(leased) != count:
            raise RuntimeError(f"the lease phase leased {len(leased)} of {count} tickets; expected all of them")
        await timed("ack", ack)
    return figures


async def bench_wakeup(kind: str, directory: Path, rounds: int = 30) -> list[float]:
    """Latency from put to handler start for a worker that has gone idle."""
    latencies: list[float] = []
    async with kharon_on(kind, directory, "wakeup") as kharon:
        started_at: dict[str, float] = {}
        arrived = trio.Event()
        router = Router()

        @router.route("ping")
        async def ping(ticket: Ticket) -> None:
            latencies.append(time.perf_counter() - started_at[ticket.id])
            await kharon.ack(ticket.id)
            arrived.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(kharon.run, router)
            for i in range(rounds):
                # Let the poller finish its last poll and go idle.
                await trio.sleep(0.2)
                arrived = trio.Event()
                started_at[f"p{i}"] = time.perf_counter()
                await kharon.put(Ticket(id=f"p{i}", type="ping"))
                await arrived.wait()
            nursery.cancel_scope.cancel()
    return latencies


async def main(kind: str, count: int, sections: set[str]) -> dict[str, object]:
    results: dict[str, object] = {
        "store": kind,
        "tickets": count,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
        # Other processes on the machine slow every figure, so record how busy it was.
        "load average at start (1 min)": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if "put" in sections:
            results["put, one caller (tickets/s)"] = round(
                await bench_put_sequential(kind, directory, min(count, 5000))
            )
            results["put, 64 callers (tickets/s)"] = round(await bench_put_concurrent(kind, directory, count))
            results["put_many, 1000 per call (tickets/s)"] = round(await bench_put_many(kind, directory, count))
        if "end-to-end" in sections:
            for settings in (Settings(), Settings(workers=64, batch_size=64)):
                label = f"end to end, workers={settings.workers} batch={settings.effective_batch_size}"
                rate, cpu = await bench_end_to_end(kind, directory, count, settings)
                results[f"{label} (tickets/s)"] = round(rate)
                results[f"{label} (CPU us/ticket)"] = round(cpu, 1)
        if "store" in sections:
            for phase, (rate, cpu) in (await bench_store(kind, directory, count)).items():
                results[f"store only, {phase} (tickets/s)"] = round(rate)
                results[f"store only, {phase} (CPU us/ticket)"] = round(cpu, 1)
        if "wakeup" in sections:
            latencies = await bench_wakeup(kind, directory)
            results["idle wake-up, median (ms)"] = round(statistics.median(latencies) * 1000, 2)
            results["idle wake-up, max (ms)"] = round(max(latencies) * 1000, 2)
    # ru_maxrss is in KiB on Linux.
    results["peak RSS (MiB)"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--tickets", type=int, default=20_000)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        metavar="SECTION",
        help=f"run only these sections, from: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    figures = trio.run(main, args.store, args.tickets, set(args.only))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
