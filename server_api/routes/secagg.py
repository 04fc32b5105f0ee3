"""Secure aggregation's device requests (docs/protocol.md "Secure aggregation"): thin handlers over
server_api.services.secagg. Every request carries the device token and the assignment's upload token."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Context, CurrentDevice, IdPath
from server_api.routes.body import receive_body
from server_api.routes.responses import AUTHENTICATED, COMMON, JSON_BODY, UPLOAD, errors
from server_api.schemas import SecAggAccepted, SecAggKeysIn, SecAggStateOut, UpdateAccepted
from server_api.services import secagg

router = APIRouter(prefix="/v1/rounds/{round_id}/secagg", tags=["secure aggregation"], responses=COMMON)

UploadToken = Annotated[str, Header(min_length=1, max_length=256)]
_STAGE_ERRORS = {**AUTHENTICATED, **errors(403, 404, 409, 410)}


def _binary_body(description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }


@router.get("", response_model=SecAggStateOut, responses={**AUTHENTICATED, **errors(403, 404)})
async def secagg_state(
    round_id: IdPath, ctx: Context, device_id: CurrentDevice, x_upload_token: UploadToken
) -> SecAggStateOut:
    """This device's view of the protocol: the stage and what the stages so far produced for it."""
    return await run_in_threadpool(secagg.view, ctx, round_id, device_id, x_upload_token)


@router.post("/keys", response_model=SecAggAccepted, responses={**_STAGE_ERRORS, **JSON_BODY})
async def advertise_keys(
    round_id: IdPath, body: SecAggKeysIn, ctx: Context, device_id: CurrentDevice, x_upload_token: UploadToken
) -> SecAggAccepted:
    """Stage 1: this device's two X25519 public keys (base64)."""
    return await run_in_threadpool(secagg.advertise, ctx, round_id, device_id, x_upload_token, body)


@router.post(
    "/shares",
    response_model=SecAggAccepted,
    responses=_STAGE_ERRORS,
    openapi_extra=_binary_body(
        "the encrypted shares for this device's neighbours, sorted by id, concatenated"
    ),
)
async def post_shares(
    round_id: IdPath, request: Request, ctx: Context, device_id: CurrentDevice, x_upload_token: UploadToken
) -> SecAggAccepted:
    """Stage 2: one encrypted share per neighbour (opaque to the server)."""
    body = await request.body()  # at most FACEFL_MAX_JSON_BYTES (limits middleware)
    return await run_in_threadpool(secagg.post_shares, ctx, round_id, device_id, x_upload_token, body)


@router.post(
    "/masked-update",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=UpdateAccepted,
    responses={**_STAGE_ERRORS, **UPLOAD},
    openapi_extra=_binary_body("safetensors: one U32 tensor 'masked' of the round's vector_length"),
)
async def masked_update(
    round_id: IdPath, request: Request, ctx: Context, device_id: CurrentDevice, x_upload_token: UploadToken
) -> UpdateAccepted:
    """Stage 3: the masked, quantized, weighted update. Durable before 202."""
    target = await run_in_threadpool(secagg.preflight_masked, ctx, round_id, device_id, x_upload_token)
    with ctx.uploads.claim((round_id, device_id), "an upload for this assignment is already in progress"):
        staged = await receive_body(request, ctx)
        try:
            return await run_in_threadpool(secagg.accept_masked, ctx, target, staged)
        finally:
            staged.unlink(missing_ok=True)


@router.post(
    "/reveal",
    response_model=SecAggAccepted,
    responses=_STAGE_ERRORS,
    openapi_extra=_binary_body("66-byte shares: dropped neighbours' mask keys, then survivors' self seeds"),
)
async def reveal_shares(
    round_id: IdPath, request: Request, ctx: Context, device_id: CurrentDevice, x_upload_token: UploadToken
) -> SecAggAccepted:
    """Stage 4: the shares the server needs to remove the masks."""
    body = await request.body()
    return await run_in_threadpool(secagg.reveal, ctx, round_id, device_id, x_upload_token, body)
