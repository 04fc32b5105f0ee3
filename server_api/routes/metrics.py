from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from server_api import metrics
from server_api.routes.responses import COMMON

router = APIRouter(tags=["health"], responses=COMMON)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
)
async def prometheus_metrics() -> Response:
    """Prometheus metrics: rounds opened/closed, reports accepted, refusals by reason, aggregation time,
    upload bytes (all workers' values when `facefl serve --workers N` started them)."""
    body, content_type = await run_in_threadpool(metrics.render)
    return Response(content=body, media_type=content_type)
