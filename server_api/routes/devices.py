from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Context, RegistrationSlot
from server_api.routes.responses import COMMON, JSON_BODY, errors
from server_api.schemas import RegisterIn, RegisterOut
from server_api.services import devices

router = APIRouter(prefix="/v1", tags=["devices"], responses=COMMON)


@router.post(
    "/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterOut,
    responses={**errors(401, 429), **JSON_BODY},
)
async def register(body: RegisterIn, ctx: Context, _: RegistrationSlot) -> RegisterOut:
    """Register a device with the enrollment secret; the bearer token is returned once."""
    return await run_in_threadpool(devices.register, ctx, body)
