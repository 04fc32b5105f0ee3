"""Device registration and authentication."""

from __future__ import annotations

import uuid

from server_api import security
from server_api.errors import ApiError, unauthorized
from server_api.orm import Device, utcnow
from server_api.schemas import RegisterIn, RegisterOut
from server_api.services.context import ServiceContext


def register(ctx: ServiceContext, body: RegisterIn) -> RegisterOut:
    if not security.constant_time_equals(body.enrollment_secret, ctx.settings.enrollment_secret_value):
        raise ApiError(401, "bad_enrollment_secret", "enrollment secret is not valid")
    device_id = uuid.uuid4().hex
    secret = security.new_secret()
    with ctx.db.write() as s:
        s.add(
            Device(
                id=device_id,
                name=body.name,
                token_hash=security.hash_secret(secret),
                capabilities=body.capabilities.model_dump() if body.capabilities else {},
            )
        )
    return RegisterOut(device_id=device_id, token=security.make_device_token(device_id, secret))


def authenticate(ctx: ServiceContext, token: str) -> str:
    """The device id for a bearer token, or 401."""
    parts = security.split_device_token(token)
    if parts is None:
        raise unauthorized()
    device_id, secret = parts
    with ctx.db.read() as s:
        device = s.get(Device, device_id)
        stored = device.token_hash if device is not None else "0" * 64
    # compare even for an unknown device so that timing does not reveal which ids exist
    ok = security.matches(secret, stored)
    if device is None or not ok:
        raise unauthorized()
    return device_id


def touch(ctx: ServiceContext, device_id: str) -> None:
    with ctx.db.write() as s:
        device = s.get(Device, device_id)
        if device is not None:
            device.last_seen_at = utcnow()
