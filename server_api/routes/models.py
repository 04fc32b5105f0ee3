from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Admin, Context, Decimal, IdPath, IdQuery, Principal
from server_api.errors import not_found
from server_api.routes.body import receive_body
from server_api.routes.immutable import CACHE_CONTROL, blob_response, not_modified
from server_api.routes.responses import ADMIN, AUTHENTICATED, COMMON, UPLOAD, errors
from server_api.schemas import ModelVersionOut
from server_api.services import models
from server_api.threads import run_sync

router = APIRouter(prefix="/v1", tags=["models"], responses=COMMON)


@router.get("/models", response_model=list[ModelVersionOut], responses=AUTHENTICATED)
async def list_models(
    ctx: Context,
    _: Principal,
    task_id: IdQuery = None,
    before: IdQuery = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000), Decimal] = None,
) -> list[ModelVersionOut]:
    """Model versions with their lineage (parent version and the round that produced each), in order;
    with `limit`, the newest `limit` versions below `before` (a page)."""
    return await run_in_threadpool(models.listing, ctx, task_id, before, limit)


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelVersionOut,
    responses={**ADMIN, **UPLOAD},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def import_model(
    request: Request,
    ctx: Context,
    _: Admin,
    architecture: Annotated[str | None, Query(max_length=32)] = None,
    embedding_dim: Annotated[int | None, Query(ge=8, le=4096)] = None,
) -> ModelVersionOut:
    """Import weights (safetensors, e.g. a `facefl pretrain` checkpoint) as a root model version (admin).

    A task then starts from it with `initial_version`.
    """
    staged = await receive_body(request, ctx)
    try:
        return await run_in_threadpool(models.import_weights, ctx, staged, architecture, embedding_dim)
    finally:
        staged.unlink(missing_ok=True)


@router.get(
    "/models/{version}/info", response_model=ModelVersionOut, responses={**AUTHENTICATED, **errors(404)}
)
async def model_info(version: IdPath, ctx: Context, _: Principal) -> ModelVersionOut:
    return await run_in_threadpool(models.info, ctx, version)


@router.get(
    "/models/{version}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "safetensors weights"},
        304: {"description": "not modified (If-None-Match)"},
        **AUTHENTICATED,
        **errors(404),
    },
)
async def download_model(
    version: IdPath,
    request: Request,
    ctx: Context,
    principal: Principal,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The weights of a model version (immutable; ETag = sha256). A version the task's release gate held
    back is not served to devices (404); the admin may still fetch it."""
    # a cached row needs no thread hop; the gate check below runs on every request all the same
    row = ctx.version_blobs.get(version)
    if row is None:
        row = await run_sync(models.version_blob, ctx, version)
    if not row.served and principal != "admin":
        raise not_found(f"model version {version}")
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if not_modified(etag, if_none_match):
        return Response(status_code=304, headers=headers)
    return await blob_response(request, ctx, row.blob_key, headers, row.size)
