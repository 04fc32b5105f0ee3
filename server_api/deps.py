"""FastAPI dependencies, injected as Annotated aliases."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BeforeValidator

from server_api import security
from server_api.errors import forbidden, rate_limited, unauthorized
from server_api.schemas import MAX_ID
from server_api.services import devices
from server_api.services.context import ServiceContext
from server_api.settings import Settings
from server_api.threads import run_sync

_bearer = HTTPBearer(auto_error=False, description="device token, or the admin token for admin endpoints")


# Dependencies that do no I/O are coroutines: FastAPI runs a plain ``def`` dependency in the thread pool,
# and each such hop costs more CPU than the check-in's own SQL.


async def get_context(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


Context = Annotated[ServiceContext, Depends(get_context)]


async def get_settings(ctx: Context) -> Settings:
    return ctx.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _admit(ctx: ServiceContext, request: Request, device_id: str) -> str:
    """Rate limit an authenticated device (429 + Retry-After); remembered on the request for logs."""
    request.state.device_id = device_id
    if ctx.limiter is not None:
        wait = ctx.limiter.check(device_id)
        if wait > 0:
            raise rate_limited(ctx.limiter.retry_after_header(wait))
    return device_id


async def _device_of(ctx: ServiceContext, token: str) -> str:
    """Authenticate a device token: from the per-process hash cache, else (first request of a device in
    this process) by a query off the event loop."""
    device_id = devices.authenticate_cached(ctx, token)
    if device_id is None:
        device_id = await run_sync(devices.authenticate, ctx, token)
    return device_id


async def device_of_request(ctx: ServiceContext, request: Request, token: str) -> str:
    """The device of a bearer token, authenticated and admitted by its rate limit (401, 429)."""
    return _admit(ctx, request, await _device_of(ctx, token))


async def current_device(creds: Bearer, request: Request) -> str:
    # the context straight from the app, not through the Context dependency: every device request
    # resolves this one, and each resolved dependency costs FastAPI more than the attribute look-up
    if creds is None:
        raise unauthorized()
    ctx: ServiceContext = request.app.state.ctx
    return await device_of_request(ctx, request, creds.credentials)


async def require_admin(ctx: Context, creds: Bearer) -> None:
    if creds is None:
        raise unauthorized()
    if not security.constant_time_equals(creds.credentials, ctx.settings.admin_token_value):
        raise forbidden("admin token required") if "." in creds.credentials else unauthorized()


async def any_principal(ctx: Context, creds: Bearer, request: Request) -> str:
    """Admin or a registered device (read-only status endpoints); devices are rate limited."""
    if creds is None:
        raise unauthorized()
    if security.constant_time_equals(creds.credentials, ctx.settings.admin_token_value):
        return "admin"
    return _admit(ctx, request, await _device_of(ctx, creds.credentials))


async def registration_slot(ctx: Context, request: Request) -> None:
    """Registrations are rate limited per client address and in all (429 + Retry-After), before the
    enrollment secret is checked: guessing the secret is limited too."""
    address = request.client.host if request.client is not None else "unknown"
    for limiter, key, who in (
        (ctx.register_limiter, address, "this address"),
        (ctx.register_global, "*", "all addresses"),
    ):
        if limiter is not None:
            wait = limiter.check(key)
            if wait > 0:
                raise rate_limited(limiter.retry_after_header(wait), f"too many registrations from {who}")


def _decimal(value: object) -> object:
    """Query and path integers are plain ASCII digits (not " 5", "+5", "5_0" or "5.0")."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value) is None:
        raise ValueError("must be a decimal integer")
    return value


Decimal = BeforeValidator(_decimal)

CurrentDevice = Annotated[str, Depends(current_device)]
RegistrationSlot = Annotated[None, Depends(registration_slot)]
Admin = Annotated[None, Depends(require_admin)]
Principal = Annotated[str, Depends(any_principal)]

# a round, task or model version id in a path or query (422 outside the columns' range, never a 500)
IdPath = Annotated[int, Path(ge=1, le=MAX_ID), Decimal]
IdQuery = Annotated[int | None, Query(ge=1, le=MAX_ID), Decimal]
