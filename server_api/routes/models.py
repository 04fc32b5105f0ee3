from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from server_api.deps import Context, Principal
from server_api.schemas import ErrorOut, ModelVersionOut
from server_api.services import models

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=list[ModelVersionOut])
async def list_models(
    ctx: Context, _: Principal, task_id: Annotated[int | None, Query(ge=1)] = None
) -> list[ModelVersionOut]:
    """Model versions with their lineage (parent version and the round that produced each)."""
    return await run_in_threadpool(models.listing, ctx, task_id)


@router.get("/models/{version}/info", response_model=ModelVersionOut, responses={404: {"model": ErrorOut}})
async def model_info(version: int, ctx: Context, _: Principal) -> ModelVersionOut:
    return await run_in_threadpool(models.info, ctx, version)


@router.get(
    "/models/{version}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "safetensors weights"},
        304: {"description": "not modified (If-None-Match)"},
        404: {"model": ErrorOut},
    },
)
async def download_model(
    version: int, ctx: Context, _: Principal, if_none_match: Annotated[str | None, Header()] = None
) -> Response:
    """The weights of a model version (immutable; ETag = sha256)."""
    path, sha = await run_in_threadpool(models.blob_path, ctx, version)
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="application/octet-stream", headers=headers)
