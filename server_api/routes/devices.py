from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from server_api.deps import Admin, Context, Decimal, RegistrationSlot
from server_api.routes.responses import ADMIN, COMMON, JSON_BODY, errors
from server_api.schemas import MAX_ID, DevicesOut, RegisterIn, RegisterOut
from server_api.services import devices, participation
from server_api.threads import run_sync, run_write

router = APIRouter(prefix="/v1", tags=["devices"], responses=COMMON)


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterOut,
    responses={**errors(401, 429), **JSON_BODY},
)
async def register(body: RegisterIn, ctx: Context, _: RegistrationSlot) -> RegisterOut:
    """Register a device with the enrollment secret; the bearer token is returned once."""
    return await run_write(ctx.db.serial_writes, devices.register, ctx, body)


@router.get("/devices", response_model=DevicesOut, responses=ADMIN)
async def list_devices(
    ctx: Context,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=1000), Decimal] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID), Decimal] = 0,
) -> DevicesOut:
    """Registered devices (admin), most recently seen first: ids, names, last check-in, rounds taken
    part in and reported; `total` counts them all."""
    return await run_sync(participation.devices, ctx, limit, offset)
