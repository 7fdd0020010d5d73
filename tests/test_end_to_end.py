"""`kharon serve` as a real process: the example router's outcomes, history, clean shutdown.

The server runs on a free loopback port with a temporary SQLite file. Its
backoff is capped at 0.2 s (`--max-backoff-delay`), so the `backoff` ticket
reaches its fifth delivery in about a second instead of about 12 s.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

# Generous, because a loaded CI machine may take seconds to start Python.
STARTUP_DEADLINE = 60.0
OUTCOME_DEADLINE = 60.0
SHUTDOWN_DEADLINE = 30.0
POLL_INTERVAL = 0.1

TYPES = ["ack", "backoff", "fail", "done", "cancel", "mystery"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {deadline} s waiting for {what}")


def kharon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kharon", *args]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    db = tmp_path / "kharon.db"
    port = free_port()
    process = subprocess.Popen(
        kharon_command(
            "serve", "--db", str(db), "--port", str(port), "--max-backoff-delay", "0.2", "--log-level", "debug"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, f"http://127.0.0.1:{port}", db
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=SHUTDOWN_DEADLINE)


def healthy(client: httpx.Client, process: subprocess.Popen[str]) -> bool:
    if process.poll() is not None:
        _, stderr = process.communicate()
        raise AssertionError(f"kharon serve exited with {process.returncode}: {stderr}")
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def last_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    return events[-1] if events else {}


def reached_outcome(ticket_type: str, events: list[dict[str, Any]]) -> bool:
    """Check the history of a ticket of `ticket_type` against the example router's outcome."""
    kinds = [event["kind"] for event in events]
    last = last_event(events)
    if ticket_type in ("ack", "cancel"):
        return last.get("kind") == ticket_type and last.get("status_after") is None
    if ticket_type == "backoff":
        return last.get("kind") == "ack" and kinds.count("lease") == 5
    if ticket_type == "done":
        return last.get("kind") == "done" and last.get("status_after") == "done"
    reason = "failed by handler" if ticket_type == "fail" else "unsupported ticket type"
    # The failed ticket expires after its TTL (10 s or 30 s), so look for the fail event itself.
    return any(
        event["kind"] == "fail" and event["status_after"] == "failed" and event["changes"].get("error_reason") == reason
        for event in events
    )


def test_serve_runs_example_router(server: tuple[subprocess.Popen[str], str, Path]) -> None:
    process, base_url, db = server

    with httpx.Client(base_url=base_url, timeout=10) as client:
        # Step 1: wait for the server.
        wait_for(lambda: healthy(client, process), STARTUP_DEADLINE, "/healthz to return 200")

        # Step 2: put one ticket of each type.
        for ticket_type in TYPES:
            response = client.post(f"/ticket/{ticket_type}/e2e-{ticket_type}", json={"sent": ticket_type})
            assert response.status_code == 202, response.text

        # Step 3: wait until every ticket reached its outcome.
        histories: dict[str, list[dict[str, Any]]] = {}

        def all_settled() -> bool:
            for ticket_type in TYPES:
                histories[ticket_type] = client.get(f"/ticket/e2e-{ticket_type}/history").json()
            return all(reached_outcome(t, histories[t]) for t in TYPES)

        wait_for(all_settled, OUTCOME_DEADLINE, "every example ticket to reach its outcome")

        # Step 4: check the projection of each ticket.
        for ticket_type in ("ack", "backoff", "cancel"):
            assert client.get(f"/ticket/e2e-{ticket_type}").status_code == 404
        done = client.get("/ticket/e2e-done").json()
        assert done["status"] == "done"
        assert done["attempts"] == 1
        for ticket_type, reason in (("fail", "failed by handler"), ("mystery", "unsupported ticket type")):
            response = client.get(f"/ticket/e2e-{ticket_type}")
            if response.status_code == 200:
                assert response.json()["status"] == "failed"
                assert response.json()["error_reason"] == reason

        # Step 5: the backoff ticket was delivered five times, retried after the first four.
        backoff_kinds = [event["kind"] for event in histories["backoff"]]
        assert backoff_kinds == ["put"] + ["lease", "retry"] * 4 + ["lease", "ack"]
        assert histories["ack"][0]["actor"] == "http"
        assert "/worker-" in histories["ack"][-1]["actor"]

        # Step 6: the CLI shows the same events, while the server runs.
        for ticket_type in TYPES:
            ticket_id = f"e2e-{ticket_type}"
            from_cli = subprocess.run(
                kharon_command("history", ticket_id, "--db", str(db), "--json"),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            cli_events = json.loads(from_cli.stdout)
            http_events = client.get(f"/ticket/{ticket_id}/history").json()
            assert [event["seq"] for event in cli_events] == [event["seq"] for event in http_events]
            assert cli_events == http_events

        table = subprocess.run(
            kharon_command("history", "e2e-backoff", "--db", str(db)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert table.stdout.count(" lease ") == 5
        assert table.stdout.count(" retry ") == 4
        assert "running → (removed)" in table.stdout

    # Step 7: SIGINT stops the server gracefully.
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=SHUTDOWN_DEADLINE)

    assert process.returncode == 0, stderr
    assert f"listening on {base_url}" in stdout
    assert "workers stopped" in stderr
    assert "Traceback" not in stderr
    assert "GET /healthz 200" in stderr

    # Step 8: everything was released: the port, the database lock, the leases.
    port = int(base_url.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    connection = sqlite3.connect(db, timeout=0)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        connection.rollback()
    finally:
        connection.close()
    stats = json.loads(
        subprocess.run(
            kharon_command("stats", "--db", str(db), "--json"), capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    assert stats["by_status"]["running"] == 0


def test_worker_stops_on_sigterm(tmp_path: Path) -> None:
    db = str(tmp_path / "kharon.db")
    subprocess.run(kharon_command("put", "done", "--id", "w1", "--db", db), capture_output=True, timeout=60, check=True)
    process = subprocess.Popen(
        kharon_command("worker", "--db", db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:

        def is_done() -> bool:
            result = subprocess.run(
                kharon_command("get", "w1", "--db", db, "--json"), capture_output=True, text=True, timeout=60
            )
            return result.returncode == 0 and json.loads(result.stdout)["status"] == "done"

        wait_for(is_done, OUTCOME_DEADLINE, "the worker to settle ticket w1 as done")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=SHUTDOWN_DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=SHUTDOWN_DEADLINE)

    assert process.returncode == 0, stderr
    assert "kharon worker: database" in stdout
    assert "received SIGTERM" in stderr
    assert "workers stopped" in stderr
