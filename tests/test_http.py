"""The HTTP API, driven in process through httpx's ASGI transport on a SQLite file."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fastapi import FastAPI

from kharon import Kharon, LeaseLost, Router, Settings, Ticket
from kharon._commands import LeaseCommand
from kharon.http import create_app
from kharon.stores import SQLiteStore

TOKEN = "s3cret-token"


@pytest.fixture
async def kharon(tmp_path: Path) -> AsyncIterator[Kharon]:
    async with Kharon(SQLiteStore(tmp_path / "kharon.db")) as kharon:
        yield kharon


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://kharon.test")


@pytest.fixture
async def client(kharon: Kharon) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(kharon)) as client:
        yield client


async def lease_one(kharon: Kharon) -> None:
    """Lease every due ticket, as a worker would, so it becomes running."""
    settings = Settings()
    await kharon.store.lease(
        LeaseCommand(
            limit=100,
            now=kharon.clock.now(),
            process_time=settings.process_time,
            backoff=settings.backoff,
            actor="test",
        )
    )


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    for fragment in fragments:
        assert fragment in body["error"]


# -- POST /ticket/{type}/{id} ----------------------------------------------------


async def test_put_stores_json_payload(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/email/t1?nice=-3", json={"to": ["a@example.com"], "n": 1.5})

    assert response.status_code == 202
    assert response.headers["location"] == "http://kharon.test/ticket/t1"
    body = response.json()
    assert body["id"] == "t1"
    assert body["type"] == "email"
    assert body["payload"] == {"to": ["a@example.com"], "n": 1.5}
    assert body["nice"] == -3
    assert body["status"] == "pending"
    assert body["runat"].endswith("Z")


async def test_put_empty_body_is_null_payload(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/email/t1")

    assert response.status_code == 202
    assert response.json()["payload"] is None


async def test_put_scalar_payload(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/email/t1", content=b'"just text"')

    assert response.status_code == 202
    assert response.json()["payload"] == "just text"


async def test_put_delay_sets_runat(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)

    response = await client.post("/ticket/email/t1?delay=90.5")

    runat = datetime.fromisoformat(response.json()["runat"])
    assert response.status_code == 202
    assert runat >= before + timedelta(seconds=90.5)
    assert runat <= datetime.now(UTC) + timedelta(seconds=90.5)


async def test_put_again_starts_over(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/t1", json=1)
    await kharon.fail("t1", error_reason="boom")

    response = await client.post("/ticket/email/t1", json=2)

    body = response.json()
    assert response.status_code == 202
    assert body["status"] == "pending"
    assert body["payload"] == 2
    assert body["error_reason"] is None
    assert body["version"] == 3


async def test_put_running_ticket_is_409(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/t1")
    await lease_one(kharon)

    response = await client.post("/ticket/email/t1")

    assert_error(response, 409, "'t1'", "running")
    assert response.json()["detail"]["state"] == "running"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b"[-Infinity]", "-Infinity is not valid JSON"),
        (b'{"a": 1e400}', "1e400 is too large"),
        (b'{"a": 1', "malformed JSON"),
        (b"{'a': 1}", "malformed JSON"),
        (b"\xff\xfe\x00", "malformed JSON"),
        (b"[" * 100_000, "malformed JSON"),
    ],
)
async def test_put_malformed_json_is_400(client: httpx.AsyncClient, body: bytes, fragment: str) -> None:
    response = await client.post("/ticket/email/t1", content=body)

    assert_error(response, 400, fragment)


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("nice=2147483648", "'nice'"),
        ("nice=-2147483649", "'nice'"),
        ("nice=99999999999999999999999", 'got "99999999999999999999999"'),
        ("nice=1.5", "'nice'"),
        ("delay=-1", "'delay'"),
        ("delay=nan", 'got "nan"'),
        ("delay=inf", 'got "inf"'),
        ("delay=1e300", "'delay'"),
        ("delay=soon", 'got "soon"'),
    ],
)
async def test_put_invalid_query_is_422(client: httpx.AsyncClient, query: str, fragment: str) -> None:
    response = await client.post(f"/ticket/email/t1?{query}")

    assert_error(response, 422, fragment)
    assert response.json()["detail"][0]["loc"][0] == "query"


async def test_put_invalid_id_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/email/bad%07id")

    assert_error(response, 422, "control character")
    assert response.json()["detail"][0]["loc"] == ["path", "ticket_id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/ticket/email/{id}"),
        ("GET", "/ticket/{id}"),
        ("GET", "/ticket/{id}/history"),
        ("POST", "/ticket/{id}/cancel"),
        ("POST", "/ticket/{id}/retry"),
        ("DELETE", "/ticket/{id}"),
    ],
)
@pytest.mark.parametrize(("ticket_id", "fragment"), [("bad%07id", "U+0007 at position 3"), ("x" * 300, "at most 255")])
async def test_invalid_path_id_is_422_everywhere(
    client: httpx.AsyncClient, method: str, path: str, ticket_id: str, fragment: str
) -> None:
    response = await client.request(method, path.format(id=ticket_id))

    assert_error(response, 422, "path parameter 'ticket_id'", fragment)
    assert response.json()["detail"][0]["loc"] == ["path", "ticket_id"]


async def test_invalid_path_type_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/bad%09type/t1")

    assert_error(response, 422, "path parameter 'ticket_type'", "U+0009 at position 3", r'got "bad\ttype".')


async def test_put_id_cancel_works_through_tickets(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"id": "cancel", "type": "email"})

    assert response.status_code == 202
    assert response.json()["id"] == "cancel"


# -- POST /tickets -----------------------------------------------------------------


async def test_tickets_single_object(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"type": "email", "payload": {"k": "v"}, "nice": 2, "delay": 60})

    body = response.json()
    assert response.status_code == 202
    assert response.headers["location"] == f"http://kharon.test/ticket/{body['id']}"
    assert body["payload"] == {"k": "v"}
    assert body["nice"] == 2
    assert datetime.fromisoformat(body["runat"]) > datetime.now(UTC) + timedelta(seconds=50)


async def test_tickets_list_with_runat(client: httpx.AsyncClient) -> None:
    tickets = [
        {"id": "a", "type": "email"},
        {"id": "b", "type": "sms", "runat": "2030-01-01T12:00:00+02:00"},
        {"type": "push"},
    ]

    response = await client.post("/tickets", json=tickets)

    body = response.json()
    assert response.status_code == 202
    assert [ticket["type"] for ticket in body] == ["email", "sms", "push"]
    assert body[1]["runat"] == "2030-01-01T10:00:00Z"
    assert body[2]["id"]


async def test_tickets_list_is_one_transaction(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/busy")
    await lease_one(kharon)

    response = await client.post("/tickets", json=[{"id": "new", "type": "email"}, {"id": "busy", "type": "email"}])

    assert_error(response, 409, "'busy'")
    assert (await client.get("/ticket/new")).status_code == 404


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"type": "x", "runat": "2030-01-01T00:00:00Z", "delay": 5}, "not both"),
        ({"type": "x", "runat": "2030-01-01T00:00:00"}, "body.runat: Input should have timezone info"),
        ({"type": "x", "surprise": 1}, "surprise"),
        ({"payload": 1}, "body.type"),
        ([{"type": "x"}, {"type": ""}], "body[1].type"),
        ({"type": "x", "nice": 2**40}, "body.nice"),
        ({"type": "x", "delay": -1}, "body.delay"),
        ("just a string", "ticket object or a list"),
        (None, "empty body"),
    ],
)
async def test_tickets_invalid_body_is_422(client: httpx.AsyncClient, body: object, fragment: str) -> None:
    content = b"" if body is None else json.dumps(body).encode()

    response = await client.post("/tickets", content=content)

    assert_error(response, 422, fragment)


async def test_naive_runat_message_is_clean(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"type": "done", "runat": "2026-01-01T00:00:00"})

    assert_error(response, 422)
    body = response.json()
    assert body["error"] == 'invalid request: body.runat: Input should have timezone info, got "2026-01-01T00:00:00".'
    assert body["detail"] == [
        {
            "loc": ["body", "runat"],
            "msg": "Input should have timezone info",
            "type": "timezone_aware",
            "input": "2026-01-01T00:00:00",
        }
    ]


async def test_runat_and_delay_message_is_clean(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"type": "done", "runat": "2026-01-01T00:00:00Z", "delay": 5})

    assert_error(response, 422, "body: give runat or delay, not both, got {")
    message = response.json()["error"]
    assert message.count("got") == 1
    assert "{'" not in message
    assert '"delay": 5' in message


async def test_long_id_is_shown_once_truncated(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"type": "done", "id": "x" * 300})

    assert_error(response, 422, 'body.id: String should have at most 255 characters, got "xxx')
    message = response.json()["error"]
    assert message.count("x" * 40) == 1
    assert len(message) < 200
    assert message.endswith("…."), message
    assert response.json()["detail"][0]["input"] == "x" * 300


async def test_value_error_prefix_is_dropped(client: httpx.AsyncClient) -> None:
    nested: object = []
    for _ in range(150):
        nested = [nested]

    response = await client.post("/tickets", json={"type": "done", "payload": nested})

    assert_error(response, 422, "body.payload: payload is nested more than 100 levels deep")
    assert "Value error" not in response.json()["error"]
    assert "Value error" not in response.json()["detail"][0]["msg"]
    assert response.json()["detail"][0]["loc"] == ["body", "payload"]


async def test_put_payload_error_names_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/email/t1", content=b"[" * 150 + b"]" * 150)

    assert_error(response, 422, "invalid request: body: payload is nested")
    assert response.json()["detail"][0]["loc"] == ["body"]


async def test_many_errors_are_sentences(client: httpx.AsyncClient) -> None:
    tickets = [{"type": ""}, {"type": "x", "nice": "high"}, {"id": "", "type": "x"}, {"type": "x", "delay": -1}]

    response = await client.post("/tickets", content=json.dumps(tickets).encode())

    assert_error(response, 422)
    message = response.json()["error"]
    assert message.startswith('invalid request: body[0].type: String should have at least 1 character, got "". ')
    assert 'body[1].nice: Input should be a valid integer, got "high". ' in message
    assert message.endswith("And 1 more error, listed in detail.")
    assert len(response.json()["detail"]) == 4


async def test_missing_field_has_no_got(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", json={"payload": 1})

    assert_error(response, 422)
    assert response.json()["error"] == "invalid request: body.type: Field required."


async def test_lone_surrogate_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", content=b'{"type": "a\\ud800"}')

    assert_error(response, 422, "body.type", r'got "a\ud800".')


async def test_tickets_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/tickets", content=b'[{"type": "x", "payload": NaN}]')

    assert_error(response, 400, "NaN")


# -- GET /ticket/{id}, history -------------------------------------------------------


async def test_get_returns_ticket(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1", json={"a": 1})

    response = await client.get("/ticket/t1")

    assert response.status_code == 200
    assert response.json()["payload"] == {"a": 1}


async def test_get_missing_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/ticket/nope")

    assert_error(response, 404, "'nope'", "not found")
    assert response.json()["detail"] == {"ticket_id": "nope"}


async def test_history_lists_every_event(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1", json={"a": 1})
    await client.post("/ticket/t1/cancel")

    response = await client.get("/ticket/t1/history")

    events = response.json()
    assert response.status_code == 200
    assert [event["kind"] for event in events] == ["put", "cancel"]
    assert [event["version"] for event in events] == [1, 2]
    assert events[0]["actor"] == "http"
    assert events[0]["status_before"] is None
    assert events[1]["status_after"] is None
    assert events[1]["changes"]["error_reason"] == "cancelled via api"


async def test_history_missing_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/ticket/nope/history")

    assert_error(response, 404, "'nope'")


# -- cancel, retry, delete -------------------------------------------------------------


async def test_cancel_removes_ticket(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1")

    response = await client.post("/ticket/t1/cancel")

    assert response.status_code == 204
    assert (await client.get("/ticket/t1")).status_code == 404


async def test_cancel_keep_keeps_cancelled(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1")

    response = await client.post("/ticket/t1/cancel?keep=true")

    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "cancelled"
    assert body["error_reason"] == "cancelled via api"


async def test_cancel_custom_reason(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1")

    response = await client.post("/ticket/t1/cancel", params={"keep": "true", "reason": "customer left"})

    assert response.json()["error_reason"] == "customer left"


async def test_cancel_missing_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/nope/cancel")

    assert_error(response, 404, "'nope'")


async def test_cancel_twice_is_409(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1")
    await client.post("/ticket/t1/cancel?keep=true")

    response = await client.post("/ticket/t1/cancel")

    assert_error(response, 409, "'cancel' is not allowed", "'cancelled'")
    detail = response.json()["detail"]
    assert detail["state"] == "cancelled"
    assert detail["operation"] == "cancel"
    assert detail["allowed"] == ["delete", "expire", "put"]


async def test_retry_makes_due_later(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/t1")
    await lease_one(kharon)

    response = await client.post("/ticket/t1/retry?delay=120")

    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "pending"
    assert datetime.fromisoformat(body["runat"]) > datetime.now(UTC) + timedelta(seconds=100)


async def test_retry_missing_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/ticket/nope/retry")

    assert_error(response, 404, "'nope'")


async def test_retry_done_ticket_is_409(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/t1")
    await kharon.done("t1")

    response = await client.post("/ticket/t1/retry")

    assert_error(response, 409, "'retry' is not allowed", "'done'")


async def test_delete_is_204_twice(client: httpx.AsyncClient) -> None:
    await client.post("/ticket/email/t1")

    first = await client.delete("/ticket/t1")
    second = await client.delete("/ticket/t1")

    assert first.status_code == 204
    assert second.status_code == 204
    assert (await client.get("/ticket/t1")).status_code == 404
    kinds = [event["kind"] for event in (await client.get("/ticket/t1/history")).json()]
    assert kinds == ["put", "delete"]


# -- GET /tickets, /stats, /healthz ------------------------------------------------------


async def test_list_pages_by_id(client: httpx.AsyncClient) -> None:
    for ticket_id in ["e", "a", "d", "b", "c"]:
        await client.post(f"/ticket/email/{ticket_id}")

    pages = []
    after = None
    while True:
        params = {"limit": "2"} if after is None else {"limit": "2", "after": after}
        page = (await client.get("/tickets", params=params)).json()
        pages.append([ticket["id"] for ticket in page["items"]])
        after = page["next"]
        if after is None:
            break

    assert pages == [["a", "b"], ["c", "d"], ["e"]]


async def test_list_filters_status_and_type(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/a")
    await client.post("/ticket/sms/b")
    await client.post("/ticket/email/c")
    await kharon.done("c")

    pending_email = (await client.get("/tickets?status=pending&type=email")).json()
    done = (await client.get("/tickets?status=done")).json()

    assert [ticket["id"] for ticket in pending_email["items"]] == ["a"]
    assert pending_email["next"] is None
    assert [ticket["id"] for ticket in done["items"]] == ["c"]


async def test_list_unknown_status_is_422(client: httpx.AsyncClient) -> None:
    response = await client.get("/tickets?status=finished")

    assert_error(response, 422, 'got "finished"', "'pending'", "'running'", "'done'", "'failed'", "'cancelled'")


@pytest.mark.parametrize("limit", ["0", "1001", "many"])
async def test_list_invalid_limit_is_422(client: httpx.AsyncClient, limit: str) -> None:
    response = await client.get(f"/tickets?limit={limit}")

    assert_error(response, 422, "'limit'")


async def test_stats_counts(client: httpx.AsyncClient, kharon: Kharon) -> None:
    await client.post("/ticket/email/a")
    await client.post("/ticket/sms/b")
    await kharon.fail("b")

    response = await client.get("/stats")

    body = response.json()
    assert response.status_code == 200
    assert body["total"] == 2
    assert body["by_status"] == {"pending": 1, "running": 0, "done": 0, "failed": 1, "cancelled": 0}
    assert body["by_type"] == {"email": {"pending": 1}, "sms": {"failed": 1}}
    assert body["events_by_kind"] == {"put": 2, "fail": 1}
    assert body["last_seq"] == 3


async def test_healthz_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_healthz_closed_store_is_503(tmp_path: Path) -> None:
    kharon = Kharon(SQLiteStore(tmp_path / "kharon.db"))
    await kharon.close()

    async with client_for(create_app(kharon)) as client:
        response = await client.get("/healthz")

    assert_error(response, 503, "store unavailable")


def error_codes(document: dict[str, Any], path: str, method: str) -> set[int]:
    operation = document["paths"][path][method]
    return {int(code) for code in operation["responses"] if int(code) >= 400}


async def test_openapi_lists_real_errors(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    expected = {
        ("/tickets", "post"): {400, 409, 413, 422, 500, 503},
        ("/ticket/{ticket_type}/{ticket_id}", "post"): {400, 409, 413, 422, 500, 503},
        ("/ticket/{ticket_id}", "get"): {404, 422, 500, 503},
        ("/ticket/{ticket_id}", "delete"): {422, 500, 503},
        ("/ticket/{ticket_id}/history", "get"): {404, 422, 500, 503},
        ("/ticket/{ticket_id}/cancel", "post"): {404, 409, 422, 500, 503},
        ("/ticket/{ticket_id}/retry", "post"): {404, 409, 422, 500, 503},
        ("/tickets", "get"): {422, 500, 503},
        ("/stats", "get"): {500, 503},
        ("/healthz", "get"): {503},
    }
    for (path, method), codes in expected.items():
        assert error_codes(document, path, method) == codes, (method, path)


async def test_openapi_lists_401_with_token(secured: httpx.AsyncClient) -> None:
    response = await secured.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})

    document = response.json()
    assert 401 in error_codes(document, "/stats", "get")
    assert 401 in error_codes(document, "/ticket/{ticket_id}", "get")
    assert 401 not in error_codes(document, "/healthz", "get")


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    docs = await client.get("/docs")

    assert "/ticket/{ticket_type}/{ticket_id}" in document["paths"]
    assert "/tickets" in document["paths"]
    assert "requestBody" in document["paths"]["/tickets"]["post"]
    assert docs.status_code == 200


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/nothing/here")

    assert_error(response, 404, "GET /nothing/here")


async def test_wrong_method_is_json_405(client: httpx.AsyncClient) -> None:
    response = await client.put("/ticket/t1")

    assert_error(response, 405, "PUT")


# -- errors raised below the routes ---------------------------------------------------------


async def test_lease_lost_is_409(kharon: Kharon) -> None:
    app = create_app(kharon)

    async def stale_settle() -> None:
        raise LeaseLost("t1", 1, 2, "ack")

    app.add_api_route("/test/stale", stale_settle)
    async with client_for(app) as client:
        response = await client.get("/test/stale")

    assert_error(response, 409, "lease 1 is stale")
    assert response.json()["detail"] == {"ticket_id": "t1", "lease": 1, "current": 2, "operation": "ack"}


async def test_unexpected_error_is_logged_500(kharon: Kharon, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(kharon)

    async def broken() -> None:
        raise RuntimeError("disk on fire")

    app.add_api_route("/test/broken", broken)
    with caplog.at_level(logging.ERROR, logger="kharon.http"):
        async with client_for(app) as client:
            response = await client.get("/test/broken")

    assert_error(response, 500, "internal server error")
    assert "disk on fire" not in response.text
    assert any("disk on fire" in record.getMessage() for record in caplog.records)


# -- body size limit --------------------------------------------------------------------------


async def test_body_at_limit_is_accepted(kharon: Kharon) -> None:
    body = json.dumps("x" * 98).encode()
    assert len(body) == 100

    async with client_for(create_app(kharon, max_body_size=100)) as client:
        response = await client.post("/ticket/email/t1", content=body)

    assert response.status_code == 202


async def test_body_over_content_length_is_413(kharon: Kharon) -> None:
    async with client_for(create_app(kharon, max_body_size=100)) as client:
        response = await client.post("/ticket/email/t1", content=json.dumps("x" * 99).encode())

    assert_error(response, 413, "101 bytes", "limit is 100 bytes")
    assert (await kharon.store.get("t1")) is None


async def test_streamed_body_over_limit_is_413(kharon: Kharon) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'"' + b"x" * 60
        yield b"x" * 60 + b'"'

    async with client_for(create_app(kharon, max_body_size=100)) as client:
        response = await client.post("/ticket/email/t1", content=chunks())

    assert "content-length" not in response.request.headers
    assert_error(response, 413, "more than 100 bytes")
    assert (await kharon.store.get("t1")) is None


async def test_default_limit_is_one_mebibyte(client: httpx.AsyncClient) -> None:
    payload = json.dumps("x" * (1024 * 1024)).encode()

    response = await client.post("/ticket/email/t1", content=payload)

    assert_error(response, 413, "limit is 1048576 bytes")


# -- authentication -------------------------------------------------------------------------------


@pytest.fixture
async def secured(kharon: Kharon) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(kharon, token=TOKEN)) as client:
        yield client


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing Authorization"),
        ("Bearer wrong", "invalid bearer token"),
        (f"Bearer {TOKEN}x", "invalid bearer token"),
        (f"Basic {TOKEN}", "Bearer scheme"),
        ("Bearer", "invalid bearer token"),
    ],
)
async def test_auth_rejects_bad_token(secured: httpx.AsyncClient, header: str | None, fragment: str) -> None:
    headers = {} if header is None else {"Authorization": header}

    response = await secured.post("/ticket/email/t1", headers=headers)

    assert_error(response, 401, fragment)
    assert response.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in response.text


async def test_auth_accepts_token(secured: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}

    put = await secured.post("/ticket/email/t1", headers=headers)
    get = await secured.get("/ticket/t1", headers={"Authorization": f"bearer {TOKEN}"})

    assert put.status_code == 202
    assert get.status_code == 200


@pytest.mark.parametrize("path", ["/ticket/t1", "/tickets", "/stats", "/openapi.json", "/docs"])
async def test_auth_guards_every_route(secured: httpx.AsyncClient, path: str) -> None:
    response = await secured.get(path)

    assert response.status_code == 401


async def test_auth_skips_healthz(secured: httpx.AsyncClient) -> None:
    response = await secured.get("/healthz")

    assert response.status_code == 200


async def test_auth_checked_before_body_limit(kharon: Kharon) -> None:
    async with client_for(create_app(kharon, token=TOKEN, max_body_size=10)) as client:
        response = await client.post("/ticket/email/t1", content=b"x" * 100)

    assert response.status_code == 401


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "non-ascii-é"])
async def test_create_app_rejects_bad_token(kharon: Kharon, token: str) -> None:
    with pytest.raises(ValueError, match="API token") as raised:
        create_app(kharon, token=token)

    if token:
        assert token not in str(raised.value)


# -- request log --------------------------------------------------------------------------------------


async def test_requests_logged_without_token(kharon: Kharon, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kharon.http"):
        async with client_for(create_app(kharon, token=TOKEN)) as client:
            await client.post(f"/ticket/email/t1?secret={TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"})
            await client.get("/ticket/t1")

    messages = [record.getMessage() for record in caplog.records if record.name == "kharon.http"]
    assert any(message.startswith("POST /ticket/email/t1 202 ") for message in messages)
    assert any(message.startswith("GET /ticket/t1 401 ") for message in messages)
    assert all(message.endswith(" ms") for message in messages)
    assert not any(TOKEN in message for message in messages)


async def test_workers_see_api_puts(kharon: Kharon) -> None:
    """A ticket put over HTTP wakes workers on the same Kharon without waiting for a poll."""
    seen = trio.Event()
    router = Router()

    @router.route("email")
    async def handle(ticket: Ticket) -> None:
        await kharon.ack("t1")
        seen.set()

    async with trio.open_nursery() as nursery, client_for(create_app(kharon)) as client:
        await nursery.start(kharon.run, router)
        await client.post("/ticket/email/t1")
        with trio.fail_after(5):
            await seen.wait()
        nursery.cancel_scope.cancel()

    kinds = [event.kind.value for event in await kharon.history("t1")]
    assert kinds == ["put", "lease", "ack"]


@pytest.mark.parametrize(
    ("ticket_id", "encoded"),
    [("日本3", "%E6%97%A5%E6%9C%AC3"), ("a?b#c d", "a%3Fb%23c%20d"), ("x/y", "x%2Fy")],
)
async def test_location_percent_encodes_id(client: httpx.AsyncClient, ticket_id: str, encoded: str) -> None:
    response = await client.post("/tickets", json={"type": "t", "id": ticket_id})

    assert response.status_code == 202
    assert response.headers["location"] == f"http://kharon.test/ticket/{encoded}"
    assert response.json()["id"] == ticket_id
