"""Bounded request bodies: size, read timeouts and concurrent uploads, enforced as an ASGI middleware.

Runs before routing, authentication and parsing, so that a request that will be refused costs no more
than its headers:

- every body has a size limit: ``FACEFL_MAX_UPLOAD_BYTES`` for the two upload endpoints (streamed to a
  staging file by the route), ``FACEFL_MAX_JSON_BYTES`` for everything else (read here, into a buffer of
  at most that size, then handed on). A declared Content-Length above the limit is refused at once,
  a body that grows past it while streaming as soon as it does: 413 ``too_large``;
- no byte for ``FACEFL_BODY_IDLE_TIMEOUT_S`` seconds, or a body not complete ``FACEFL_BODY_DEADLINE_S``
  seconds after the request started: 408 ``body_timeout`` (the route deletes its staging file);
- at most ``FACEFL_MAX_CONCURRENT_UPLOADS`` uploads in flight per worker process; beyond it 503
  ``busy`` with Retry-After, before anything is staged;
- a client that disconnects mid-body is logged as one INFO line, not an ERROR traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_api import metrics
from server_api.errors import ApiError, too_large
from server_api.services.context import log
from server_api.settings import Settings

#: (method, path) of the endpoints whose body is streamed to a staging file (routes.body.receive_body)
STREAMED_BODIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("POST", re.compile(r"/v1/rounds/[^/]+/updates")),
    ("POST", re.compile(r"/v1/rounds/[^/]+/secagg/masked-update")),
    ("POST", re.compile(r"/v1/models")),
)


def body_timeout(detail: str) -> ApiError:
    return ApiError(408, "body_timeout", detail)


def busy(retry_after: str) -> ApiError:
    return ApiError(
        503, "busy", "too many uploads in flight on this server; retry later", {"Retry-After": retry_after}
    )


def _is_streamed(scope: Scope) -> bool:
    method, path = scope.get("method", ""), scope.get("path", "")
    return any(method == m and pattern.fullmatch(path) for m, pattern in STREAMED_BODIES)


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() and len(text) < 20 else None
    return None


class _BodyReader:
    """Wraps ``receive``: counts body bytes against ``limit`` and bounds the wait for each chunk."""

    def __init__(self, receive: Receive, limit: int, idle_s: float, deadline_s: float) -> None:
        self._receive = receive
        self.limit = limit
        self.idle_s = idle_s
        self.deadline = time.monotonic() + deadline_s
        self.received = 0
        self.done = False

    async def receive(self) -> Message:
        if self.done:  # after the body: http.disconnect listeners wait as long as they like
            return await self._receive()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise body_timeout("the request body was not complete before the body deadline")
        wait = min(self.idle_s, remaining)
        try:
            # asyncio's own timeout: about half the CPU of anyio's cancel scope, paid on every request
            async with asyncio.timeout(wait):
                message = await self._receive()
        except TimeoutError:
            if wait < self.idle_s:
                raise body_timeout("the request body was not complete before the body deadline") from None
            raise body_timeout(f"no body bytes for {self.idle_s:g} s") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise too_large(self.limit)
            self.done = not message.get("more_body", False)
        else:
            self.done = True
        return message

    async def read_all(self) -> tuple[bytes, bool]:
        """The whole (small) body; False when the client disconnected first."""
        parts: list[bytes] = []
        while not self.done:
            message = await self.receive()
            if message["type"] != "http.request":
                return b"", False
            parts.append(message.get("body", b""))
        return b"".join(parts), True


class BodyLimits:
    """The ASGI middleware (``app.add_middleware(BodyLimits, settings=...)``); one instance per worker."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.uploads_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.settings
        streamed = _is_streamed(scope)
        limit = s.max_upload_bytes if streamed else s.max_json_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _answer(scope, send, too_large(limit))
            return
        reader = _BodyReader(receive, limit, s.body_idle_timeout_s, s.body_deadline_s)
        if streamed:
            if self.uploads_in_flight >= s.max_concurrent_uploads:
                await _answer(scope, send, busy(str(max(1, math.ceil(s.min_retry_after_s)))))
                return
            self.uploads_in_flight += 1  # one event loop per worker: no lock needed
            try:
                await self._run(scope, reader.receive, send)
            finally:
                self.uploads_in_flight -= 1
            return
        try:
            body, connected = await reader.read_all()
        except ApiError as exc:
            await _answer(scope, send, exc)
            return
        if not connected:
            _disconnected(scope, reader.received)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._run(scope, replay, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:  # nobody is left to answer: one line, not a traceback at ERROR
            _disconnected(scope, None)


def _disconnected(scope: Scope, received: int | None) -> None:
    extra: dict[str, Any] = {"path": scope.get("path", "")}
    if received is not None:
        extra["bytes"] = received
    log.info("client disconnected before its request body was complete", extra=extra)


async def _answer(scope: Scope, send: Send, exc: ApiError) -> None:
    """A JSON error answered by the middleware itself (counted and logged like every refusal)."""
    metrics.REFUSALS.labels(status=str(exc.status_code), reason=exc.code).inc()
    log.info(
        "request refused: %s",
        exc.detail,
        extra={"status": exc.status_code, "code": exc.code, "path": scope.get("path", "")},
    )
    body = json.dumps({"detail": exc.detail, "code": exc.code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    # the body was not read: the connection cannot be reused for another request
    headers.append((b"connection", b"close"))
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
