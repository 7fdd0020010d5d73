"""Pure ASGI middleware: request log, bearer-token check, body size limit.

`create_app` stacks them outermost first: the log records every response,
including the 401 and 413 the other two send, and an unauthenticated request
is rejected before its body is read.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kharon.http._errors import error_response

__all__ = ["BearerAuthMiddleware", "BodyLimitMiddleware", "RequestLogMiddleware"]

logger = logging.getLogger("kharon.http")


class RequestLogMiddleware:
    """Log each request at DEBUG; log and turn unhandled exceptions into 500.

    Only the method, the path (never the query string or headers, so never the
    token), the status and the duration are logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        method = scope["method"]
        path = scope["path"]
        started_at = time.perf_counter()
        # No response at all (the client went away first) is logged as status 0.
        status = 0

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception as exc:
            logger.error("%s %s failed: %r", method, path, exc, exc_info=exc)
            if status == 0:
                response = error_response(500, f"internal server error: {type(exc).__name__}")
                await response(scope, receive, send_and_record)
        finally:
            elapsed_ms = (time.perf_counter() - started_at) * 1000
            logger.debug("%s %s %d %.1f ms", method, path, status, elapsed_ms)


class BearerAuthMiddleware:
    """Reject requests without `Authorization: Bearer <token>` with 401.

    Paths in `public_paths` pass without a token. The comparison takes the same
    time wherever the presented token first differs from the expected one.
    """

    def __init__(self, app: ASGIApp, token: str, public_paths: frozenset[str]) -> None:
        self.app = app
        self._expected = token.encode("ascii")
        self._public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public_paths:
            await self.app(scope, receive, send)
            return

        header = Headers(scope=scope).get("authorization")
        if header is None:
            problem = "missing Authorization header"
        else:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer":
                problem = "the Authorization header must use the Bearer scheme"
            elif hmac.compare_digest(presented.strip().encode("latin-1"), self._expected):
                await self.app(scope, receive, send)
                return
            else:
                problem = "invalid bearer token"

        response = error_response(
            401,
            f"unauthorized: {problem}; send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Read the whole request body up front; send 413 once it exceeds `max_size` bytes.

    The size is counted while reading, so a missing or false Content-Length
    does not get a larger body through. A declared Content-Length over the
    limit is rejected before anything is read. The app then receives the body
    as a single message.
    """

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # Step 1: reject on the declared length.
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, f"invalid Content-Length header {declared!r}")(scope, receive, send)
                return
            if int(declared) > self.max_size:
                await self._too_large(scope, receive, send, f"Content-Length is {declared} bytes")
                return

        # Step 2: read and count.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_size:
                await self._too_large(scope, receive, send, f"more than {self.max_size} bytes were sent")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        # Step 3: hand the buffered body to the app, then pass later messages
        # (such as http.disconnect) through.
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        response = error_response(
            413,
            f"request body too large: {reason}, the limit is {self.max_size} bytes",
            {"max_body_size": self.max_size},
        )
        await response(scope, receive, send)
