"""The console's pages: each handler reads through the same services as the REST API and renders
one template, off the event loop."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.responses import Response

from server_api.console import render, views
from server_api.console.auth import Operator, csrf_of
from server_api.console.refusals import RefusalTally
from server_api.errors import ApiError
from server_api.schemas import MAX_ID
from server_api.services import models, participation, rounds, tasks
from server_api.services.context import ServiceContext

router = APIRouter(prefix="/console", include_in_schema=False)

#: rounds (and model versions) per page of a task: 1,000 rounds render in one page, but a page of 200
#: keeps every refresh of a long task's page small; older ones are a link away
PAGE = 200
DEVICES_PAGE = 100
#: seconds between reloads of a page that shows an open round
REFRESH_S = 5
_CSS = files("server_api.console").joinpath("static/console.css").read_bytes()


def parse_id(text: str | None) -> int | None:
    """A database id from a path or query (decimal, 1..MAX_ID), else None: junk is a 404, never a 500."""
    if text is None or re.fullmatch(r"[0-9]{1,10}", text) is None:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_ID else None


def _ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def _tally(request: Request) -> RefusalTally:
    tally: RefusalTally = request.app.state.refusals
    return tally


def _guard(csrf: str, build: Callable[..., Response], *args: object) -> Response:
    """Run a page builder; a service's refusal (unknown task, ...) becomes an HTML error page."""
    try:
        return build(*args)
    except ApiError as exc:
        return render.error(exc.status_code, exc.detail, csrf)


@router.get("/console.css")
async def stylesheet() -> Response:
    return Response(_CSS, media_type="text/css", headers={"Cache-Control": "private, max-age=300"})


def _tasks_page(ctx: ServiceContext, csrf: str) -> Response:
    listing = tasks.listing(ctx)
    open_now = any(t.current_round is not None for t in listing)  # open or aggregating
    return render.page(
        "tasks.html", title="Tasks", tasks=listing, csrf=csrf, refresh=REFRESH_S if open_now else None
    )


@router.get("")
async def tasks_page(request: Request, s: Operator) -> Response:
    return await run_in_threadpool(
        _guard, csrf_of(request, s), _tasks_page, _ctx(request), csrf_of(request, s)
    )


def _task_page(
    ctx: ServiceContext, tally: RefusalTally, task_id: int, before: int | None, csrf: str
) -> Response:
    task = tasks.get(ctx, task_id)
    page_rounds = tasks.rounds_of(ctx, task_id, before, PAGE)
    metrics = models.metrics_by_version(ctx, task_id)
    now = datetime.now(UTC)
    refused = tally.of_rounds([r.id for r in page_rounds])
    rows = [views.round_row(r, refused.get(r.id, {}), now) for r in reversed(page_rounds)]
    oldest = page_rounds[0].number if page_rounds else None
    return render.page(
        "task.html",
        title=f"Task {task.id}",
        task=task,
        rows=rows,
        older=oldest if oldest is not None and oldest > 1 else None,
        paged=before is not None,
        eval_chart=views.eval_chart(metrics),
        train_chart=views.train_chart(page_rounds),
        versions=len(metrics),
        evaluated=views.evaluated(metrics),
        csrf=csrf,
        refresh=REFRESH_S if task.current_round is not None else None,  # open or aggregating
    )


@router.get("/tasks/{task_id}")
async def task_page(request: Request, s: Operator, task_id: str, before: str | None = None) -> Response:
    csrf = csrf_of(request, s)
    ident, before_number = parse_id(task_id), parse_id(before)
    if ident is None or (before is not None and before_number is None):
        return await run_in_threadpool(
            render.error, 404, f"no task {task_id!r} (or no round {before!r})", csrf
        )
    return await run_in_threadpool(
        _guard, csrf, _task_page, _ctx(request), _tally(request), ident, before_number, csrf
    )


def _versions_page(
    ctx: ServiceContext, task_id: int, before: int | None, csrf: str, server_url: str
) -> Response:
    task = tasks.get(ctx, task_id)
    # one more than a page: whether older versions exist
    versions = models.listing(ctx, task_id, before, PAGE + 1)
    shown = list(reversed(versions[-PAGE:]))
    older = shown[-1].version if len(versions) > PAGE else None
    return render.page(
        "versions.html",
        title=f"Task {task.id}: model versions",
        task=task,
        versions=shown,
        older=older,
        eval_report=views.eval_report,
        server_url=server_url,
        csrf=csrf,
    )


@router.get("/tasks/{task_id}/versions")
async def versions_page(request: Request, s: Operator, task_id: str, before: str | None = None) -> Response:
    csrf = csrf_of(request, s)
    ident, before_version = parse_id(task_id), parse_id(before)
    if ident is None or (before is not None and before_version is None):
        return await run_in_threadpool(render.error, 404, f"no task {task_id!r}", csrf)
    server_url = str(request.base_url).rstrip("/")
    return await run_in_threadpool(
        _guard, csrf, _versions_page, _ctx(request), ident, before_version, csrf, server_url
    )


def _round_page(ctx: ServiceContext, tally: RefusalTally, round_id: int, csrf: str) -> Response:
    rnd = rounds.get(ctx, round_id)
    task = tasks.get(ctx, rnd.task_id)
    participants = participation.round_participants(ctx, round_id)
    refused = tally.of_rounds([round_id]).get(round_id, {})
    return render.page(
        "round.html",
        title=f"Round {rnd.number} of task {task.id}",
        task=task,
        row=views.round_row(rnd, refused, datetime.now(UTC)),
        round=rnd,
        participants=participants,
        by_device=tally.of_devices([p.device_id for p in participants]),
        csrf=csrf,
        refresh=REFRESH_S if rnd.status in ("open", "aggregating") else None,
    )


@router.get("/rounds/{round_id}")
async def round_page(request: Request, s: Operator, round_id: str) -> Response:
    csrf = csrf_of(request, s)
    ident = parse_id(round_id)
    if ident is None:
        return await run_in_threadpool(render.error, 404, f"no round {round_id!r}", csrf)
    return await run_in_threadpool(_guard, csrf, _round_page, _ctx(request), _tally(request), ident, csrf)


def _devices_page(ctx: ServiceContext, tally: RefusalTally, page_number: int, csrf: str) -> Response:
    roster = participation.devices(ctx, DEVICES_PAGE, (page_number - 1) * DEVICES_PAGE)
    pages = max(1, -(-roster.total // DEVICES_PAGE))
    return render.page(
        "devices.html",
        title="Devices",
        roster=roster,
        page_number=page_number,
        pages=pages,
        by_device=tally.of_devices([d.id for d in roster.devices]),
        total_refused=tally.total(),
        csrf=csrf,
    )


@router.get("/devices")
async def devices_page(request: Request, s: Operator, page: str | None = None) -> Response:
    csrf = csrf_of(request, s)
    number = 1 if page is None else parse_id(page)
    if number is None:
        return await run_in_threadpool(render.error, 404, f"no page {page!r}", csrf)
    return await run_in_threadpool(_guard, csrf, _devices_page, _ctx(request), _tally(request), number, csrf)


@router.get("/models/{version}/weights")
async def download_weights(request: Request, s: Operator, version: str) -> Response:
    """The version's safetensors weights, for the logged-in operator (held-back versions included)."""
    ident = parse_id(version)
    try:
        if ident is None:
            raise ApiError(404, "not_found", f"no model version {version!r}")
        path, sha = await run_in_threadpool(models.served_blob_path, _ctx(request), ident, "admin")
    except ApiError as exc:
        return await run_in_threadpool(render.error, exc.status_code, exc.detail, csrf_of(request, s))
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"facefl-v{ident}.safetensors",
        headers={"ETag": f'"{sha}"', "Cache-Control": "private, no-store"},
    )
