from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server_api.deps import Context
from server_api.routes.responses import COMMON
from server_api.schemas import HealthOut

router = APIRouter(prefix="/v1", tags=["health"], responses=COMMON)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(ctx: Context) -> HealthOut | JSONResponse:
    def ping() -> bool:
        try:
            with ctx.db.read() as s:
                s.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    if await run_in_threadpool(ping):
        return HealthOut(status="ok", db="ok")
    return JSONResponse(status_code=503, content={"status": "degraded", "db": "unreachable"})
