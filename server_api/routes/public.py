"""FedFR's public set (pack + per-version feature bank) and FedFace's per-device class embedding."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Context, CurrentDevice, IdPath, Principal
from server_api.routes.immutable import CACHE_CONTROL, blob_response, not_modified
from server_api.routes.responses import AUTHENTICATED, COMMON, errors
from server_api.services import public, server_state

router = APIRouter(prefix="/v1", tags=["public set"], responses=COMMON)

_BINARY: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "safetensors"},
    304: {"description": "not modified (If-None-Match)"},
    **AUTHENTICATED,
    **errors(404),
}


async def _immutable_file(request: Request, ctx: Context, key: str, if_none_match: str | None) -> Response:
    etag = f'"{key}"'  # blobs are content-addressed: the key is the sha256
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if not_modified(etag, if_none_match):
        return Response(status_code=304, headers=headers)
    return await blob_response(request, ctx, key, headers)


@router.get("/tasks/{task_id}/public-pack", response_class=Response, responses=_BINARY)
async def public_pack(
    task_id: IdPath,
    request: Request,
    ctx: Context,
    _: Principal,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """FedFR: every image of the task's public set (uint8, model input size) with identity labels.

    The same bytes for every device: download once, cache by ETag (sha256).
    """
    key = await run_in_threadpool(public.task_pack_key, ctx, task_id)
    return await _immutable_file(request, ctx, key, if_none_match)


@router.get("/models/{version}/public-bank", response_class=Response, responses=_BINARY)
async def public_bank(
    version: IdPath,
    request: Request,
    ctx: Context,
    _: Principal,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """FedFR: fp16 embeddings of the public pack under this version, with identity labels.

    Served whole to every device, which selects its hard negatives locally: the server never learns
    which public faces resemble a device's people.
    """
    key = await run_in_threadpool(public.bank_key, ctx, version)
    return await _immutable_file(request, ctx, key, if_none_match)


@router.get("/models/{version}/class-embedding", response_class=Response, responses=_BINARY)
async def class_embedding(version: IdPath, ctx: Context, device_id: CurrentDevice) -> Response:
    """FedFace: this device's own class embedding after the server's spreadout (404 before its first
    report). A device can read its own row only."""
    data = await run_in_threadpool(server_state.device_state_of, ctx, version, device_id)
    return Response(content=data, media_type="application/octet-stream")
