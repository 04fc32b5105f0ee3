"""App factory: `uvicorn --factory server_api.app:create_app` or `facefl serve`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from server_api import console, logs, metrics
from server_api import db as dbmod
from server_api.checkin_fast import CheckinFastPath
from server_api.errors import ApiError
from server_api.limits import BodyLimits
from server_api.routes import devices, health, models, public, rounds, secagg, tasks
from server_api.routes import metrics as metrics_route
from server_api.services import ticker
from server_api.services.context import ServiceContext, log
from server_api.settings import Settings


async def _ticker(ctx: ServiceContext) -> None:
    """Deadlines and recovery, checked periodically off the event loop (no in-memory timer owns them)."""
    while True:
        try:
            await run_in_threadpool(ticker.tick, ctx)
        except Exception:
            log.exception("tick failed")
        await asyncio.sleep(ctx.settings.tick_interval_s)


def _refused(request: Request, status: int, code: str, detail: str) -> None:
    """Count and log a refusal (one line, with the device and round when known)."""
    metrics.REFUSALS.labels(status=str(status), reason=code).inc()
    extra: dict[str, object] = {"status": status, "code": code, "path": request.url.path}
    device_id = getattr(request.state, "device_id", None)
    if device_id is not None:
        extra["device_id"] = device_id
    round_id = str(request.path_params.get("round_id", ""))
    if round_id.isdigit():
        extra["round_id"] = int(round_id)
    log.info("request refused: %s", detail, extra=extra)
    request.app.state.refusals.record(status, code, extra.get("round_id"), device_id)  # for the console


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods some route answers for this path (whatever the routers' nesting)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        probe = {**scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            await run_in_threadpool(dbmod.upgrade, settings.database_url)
        ctx = ServiceContext.from_settings(settings)
        app.state.ctx = ctx
        if ctx.blobs.swept:
            log.info("staging: removed %d files left by stopped processes", ctx.blobs.swept)
        ticker = asyncio.create_task(_ticker(ctx))
        if settings.dev_mode:
            log.warning(
                "FACEFL_DEV_MODE is on: well-known dev tokens may be in use; never expose this server"
            )
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await run_in_threadpool(ctx.close)

    app = FastAPI(
        title="facefl aggregation server",
        version="0.1.0",
        description="Federated face recognition: rounds, updates, aggregation and model versions.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _refused(request, exc.status_code, exc.code, exc.detail)
        return JSONResponse(
            status_code=exc.status_code, content={"detail": exc.detail, "code": exc.code}, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        _refused(request, 422, "invalid_request", "; ".join(parts))
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts), "code": "invalid_request"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Routing and framework errors (404 unknown path, 405, 400) in the ErrorOut shape; a 405 lists
        every method of the path in Allow (Starlette names only the first route's)."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        _refused(request, exc.status_code, code, str(exc.detail))
        return JSONResponse(
            status_code=exc.status_code, content={"detail": str(exc.detail), "code": code}, headers=headers
        )

    for module in (health, devices, tasks, rounds, secagg, models, public, metrics_route):
        app.include_router(module.router)
    console.install(app)  # the operator's console: HTML pages under /console
    # POST /v1/checkin without FastAPI's routing and dependencies (the route answers all it hands on)
    app.add_middleware(CheckinFastPath, on_error=_api_error)
    app.add_middleware(BodyLimits, settings=settings)  # body size, timeouts, uploads in flight (first)
    return app
