"""Device registration and authentication."""

from __future__ import annotations

import uuid

from server_api import security
from server_api.errors import ApiError, unauthorized
from server_api.orm import Device, utcnow
from server_api.schemas import RegisterIn, RegisterOut
from server_api.services import queries
from server_api.services.context import ServiceContext

# compared against when the device is unknown, so that timing does not reveal which ids exist
_NO_HASH = "0" * 64


def register(ctx: ServiceContext, body: RegisterIn) -> RegisterOut:
    if not security.constant_time_equals(body.enrollment_secret, ctx.settings.enrollment_secret_value):
        raise ApiError(401, "bad_enrollment_secret", "enrollment secret is not valid")
    device_id = uuid.uuid4().hex
    secret = security.new_secret()
    token_hash = security.hash_secret(secret)
    capabilities = body.capabilities.model_dump() if body.capabilities else {}
    with ctx.db.driver_write() as tx:
        queries.insert_device(tx, device_id, body.name, token_hash, capabilities, utcnow())
    ctx.device_tokens.put(device_id, token_hash)  # committed: the device's first request needs no query
    return RegisterOut(device_id=device_id, token=security.make_device_token(device_id, secret))


def authenticate_cached(ctx: ServiceContext, token: str) -> str | None:
    """The device id for a bearer token whose device is in the cache (401 when the secret is wrong), or
    None when the device is not cached: then :func:`authenticate` asks the database. No I/O: safe on the
    event loop (one SHA-256 of a short string)."""
    parts = security.split_device_token(token)
    if parts is None:
        raise unauthorized()
    device_id, secret = parts
    stored = ctx.device_tokens.get(device_id)
    if stored is None:
        return None
    if not security.matches(secret, stored):
        raise unauthorized()
    return device_id


def authenticate(ctx: ServiceContext, token: str) -> str:
    """The device id for a bearer token, or 401 (reads the database; caches the hash of a known device)."""
    parts = security.split_device_token(token)
    if parts is None:
        raise unauthorized()
    device_id, secret = parts
    with ctx.db.driver_read() as tx:
        found = queries.device_token_hash(tx, device_id)
    ok = security.matches(secret, found if found is not None else _NO_HASH)
    if found is None or not ok:
        raise unauthorized()
    ctx.device_tokens.put(device_id, found)
    return device_id


def touch(ctx: ServiceContext, device_id: str) -> None:
    with ctx.db.write() as s:
        device = s.get(Device, device_id)
        if device is not None:
            device.last_seen_at = utcnow()
