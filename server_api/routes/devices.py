from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Context, RegistrationSlot
from server_api.schemas import ErrorOut, RegisterIn, RegisterOut
from server_api.services import devices

router = APIRouter(prefix="/v1", tags=["devices"])


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterOut,
    responses={401: {"model": ErrorOut}},
)
async def register(body: RegisterIn, ctx: Context, _: RegistrationSlot) -> RegisterOut:
    """Register a device with the enrollment secret; the bearer token is returned once."""
    return await run_in_threadpool(devices.register, ctx, body)
