from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from pydantic import TypeAdapter

from server_api.deps import Admin, Context, CurrentDevice, Decimal, IdPath, Principal
from server_api.routes.body import stream_body
from server_api.routes.responses import ADMIN, AUTHENTICATED, COMMON, JSON_BODY, UPLOAD, errors
from server_api.schemas import (
    CheckinIn,
    CheckinOut,
    ParticipantOut,
    RoundOut,
    TrainAction,
    UpdateAccepted,
    WaitAction,
)
from server_api.services import participation, rounds, updates
from server_api.services.context import ServiceContext
from server_api.threads import run_sync, run_write

router = APIRouter(prefix="/v1", tags=["rounds"], responses=COMMON)


# the service builds a valid CheckinOut: serialized as FastAPI would (same adapter, by alias), without
# validating it a second time against the response model
_CHECKIN_OUT: TypeAdapter[TrainAction | WaitAction] = TypeAdapter(CheckinOut)


async def checkin_response(ctx: ServiceContext, device_id: str, body: CheckinIn) -> Response:
    """The check-in of an authenticated device, answered (the route's work after its dependencies; also
    :mod:`server_api.checkin_fast`'s, which answers most check-ins without FastAPI's routing)."""
    result = await run_write(ctx.db.serial_writes, rounds.checkin, ctx, device_id, body)
    headers = None
    if isinstance(result, WaitAction):
        headers = {"Retry-After": str(max(1, round(result.retry_after_s)))}
    return Response(
        _CHECKIN_OUT.dump_json(result, by_alias=True), media_type="application/json", headers=headers
    )


@router.post("/checkin", response_model=CheckinOut, responses={**AUTHENTICATED, **JSON_BODY})
async def checkin(body: CheckinIn, device_id: CurrentDevice, request: Request) -> Response:
    """Offer this device for training: an assignment, or a wait with Retry-After (pace steering)."""
    ctx: ServiceContext = request.app.state.ctx  # not a dependency: one fewer to resolve per check-in
    return await checkin_response(ctx, device_id, body)


@router.get("/rounds/{round_id}", response_model=RoundOut, responses={**AUTHENTICATED, **errors(404)})
async def get_round(round_id: IdPath, ctx: Context, _: Principal) -> RoundOut:
    return await run_sync(rounds.get, ctx, round_id)


@router.get(
    "/rounds/{round_id}/participants",
    response_model=list[ParticipantOut],
    responses={**ADMIN, **errors(404)},
)
async def round_participants(round_id: IdPath, ctx: Context, _: Admin) -> list[ParticipantOut]:
    """The devices selected for the round (admin): reported, pending or dropped, with upload sizes."""
    return await run_sync(participation.round_participants, ctx, round_id)


@router.post("/rounds/{round_id}/abandon", response_model=RoundOut, responses={**ADMIN, **errors(404, 409)})
async def abandon_round(round_id: IdPath, ctx: Context, _: Admin) -> RoundOut:
    """Abandon the open round (admin): its reports are dropped and the next round opens on the same base
    version. 409 when the round is not open."""
    return await run_sync(rounds.abandon_open, ctx, round_id)


@router.post(
    "/rounds/{round_id}/updates",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=UpdateAccepted,
    responses={**AUTHENTICATED, **UPLOAD, **errors(403, 404, 409, 410)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_update(
    round_id: IdPath,
    request: Request,
    ctx: Context,
    device_id: CurrentDevice,
    num_samples: Annotated[int, Query(ge=1, le=1_000_000_000), Decimal],
    x_upload_token: Annotated[str, Header(min_length=1, max_length=256)],
    x_metrics: Annotated[str | None, Header(max_length=4096)] = None,
) -> UpdateAccepted:
    """Upload this device's model delta (safetensors body). Durable before 202."""
    metrics = updates.parse_metrics(x_metrics)
    # authorized and checked before the body is read; its staging file opened in the same thread hop
    target, staged = await run_sync(updates.open_upload, ctx, round_id, device_id, x_upload_token)
    try:
        # one upload per assignment at a time (per worker): a second concurrent one is refused, unread
        with ctx.uploads.claim((round_id, device_id), "an upload for this assignment is already in progress"):
            # validated and staged in one pass while it streams in
            await stream_body(request, ctx, staged.write_chunks, lambda: staged.failed)
            return await run_sync(
                lambda: updates.accept(ctx, target, staged, num_samples=num_samples, metrics=metrics)
            )
    finally:
        staged.discard()
