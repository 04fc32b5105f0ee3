"""``POST /v1/checkin`` answered without FastAPI's routing and dependency injection: the hot path.

Every device checks in again and again, and for so small a request FastAPI's machinery costs more CPU
than the check-in's own work: matching the path against the routes before it, solving the route's
dependencies (``solve_dependencies``), building the request and its exit stacks. This ASGI layer sits
inside :class:`server_api.limits.BodyLimits` (so the body has been size-checked and read) and outside
FastAPI's exception middleware and router. It answers a check-in only when it can do exactly what the
route would do, and hands every other request on, unchanged and with its body, to the FastAPI route:

- another path, method or a ``root_path``; a ``Content-Type`` other than exactly ``application/json``;
  no bearer token (read as ``fastapi.security.HTTPBearer`` reads it); an empty body, a body that is not
  JSON (``json.loads``, as Starlette's ``Request.json``) or not a valid :class:`CheckinIn` (validated as
  FastAPI validates a body: ``validate_python(..., from_attributes=True)``): the route answers, as it
  always did (401 or 422 in its own words and order);
- otherwise the same steps as the route after its body is parsed: authentication and the device's rate
  limit (:func:`server_api.deps.device_of_request`), then the check-in and its answer
  (:func:`server_api.routes.rounds.checkin_response`). An :class:`ApiError` (401, 429, ...) is answered by
  the app's own ApiError handler (counted, logged and recorded for the console like any refusal).

The route authenticates before it validates the body and this layer after; a request with an invalid
body is handed on before anything is authenticated or counted against a rate limit, so the answer is
the route's either way. The route stays registered: it is what the OpenAPI document describes.
``tests/server_api/test_checkin_fast.py`` sends the same requests with and without this layer.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_api.deps import device_of_request
from server_api.errors import ApiError
from server_api.routes.rounds import checkin_response
from server_api.schemas import CheckinIn
from server_api.services.context import ServiceContext

PATH = "/v1/checkin"
_BODY: TypeAdapter[CheckinIn] = TypeAdapter(CheckinIn)

ErrorHandler = Callable[[Request, ApiError], Awaitable[Response]]


class CheckinFastPath:
    """The ASGI layer (``app.add_middleware(CheckinFastPath, on_error=...)`` before BodyLimits, so that
    BodyLimits runs first); ``on_error`` is the app's ApiError handler."""

    def __init__(self, app: ASGIApp, on_error: ErrorHandler) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        authorization: bytes | None = None
        content_type: bytes | None = None
        for key, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if key == b"authorization" and authorization is None:
                authorization = value
            elif key == b"content-type" and content_type is None:
                content_type = value
        token = _bearer(authorization)
        if token is None or content_type != b"application/json":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                await self.app(scope, _replay(messages, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = _valid_body(b"".join(chunks))
        if body is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        request = Request(scope, receive)
        ctx: ServiceContext = scope["app"].state.ctx
        try:
            device_id = await device_of_request(ctx, request, token)
            response = await checkin_response(ctx, device_id, body)
        except ApiError as exc:
            response = await self.on_error(request, exc)
        await response(scope, receive, send)


def _bearer(authorization: bytes | None) -> str | None:
    """The credentials of ``Authorization: Bearer <credentials>``, as HTTPBearer reads them, or None."""
    if not authorization:
        return None
    scheme, _, param = authorization.decode("latin-1").partition(" ")
    credentials = param.strip()
    if not scheme or not credentials or scheme.lower() != "bearer":
        return None
    return credentials


def _valid_body(raw: bytes) -> CheckinIn | None:
    """The body as the route would have it, or None where the route would refuse it (or might)."""
    if not raw:
        return None
    try:
        data: Any = json.loads(raw)
        return _BODY.validate_python(data, from_attributes=True)
    except Exception:  # not JSON, not a CheckinIn, or anything else: the route answers it
        return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first hands out the messages already read."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
