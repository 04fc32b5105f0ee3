from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Admin, Context, Decimal, IdPath, IdQuery, Principal
from server_api.routes.responses import ADMIN, AUTHENTICATED, COMMON, JSON_BODY, errors
from server_api.schemas import RoundOut, TaskOut
from server_api.services import tasks
from server_api.task_schemas import TaskIn

router = APIRouter(prefix="/v1", tags=["tasks"], responses=COMMON)


@router.post(
    "/tasks",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
    responses={**ADMIN, **JSON_BODY},
)
async def create_task(body: TaskIn, ctx: Context, _: Admin) -> TaskOut:
    """Create a federated task: builds its initial model version and opens round 1 (admin)."""
    return await run_in_threadpool(tasks.create, ctx, body)


@router.get("/tasks", response_model=list[TaskOut], responses=AUTHENTICATED)
async def list_tasks(ctx: Context, _: Principal) -> list[TaskOut]:
    return await run_in_threadpool(tasks.listing, ctx)


@router.get("/tasks/{task_id}", response_model=TaskOut, responses={**AUTHENTICATED, **errors(404)})
async def get_task(task_id: IdPath, ctx: Context, _: Principal) -> TaskOut:
    return await run_in_threadpool(tasks.get, ctx, task_id)


@router.get(
    "/tasks/{task_id}/rounds", response_model=list[RoundOut], responses={**AUTHENTICATED, **errors(404)}
)
async def task_rounds(
    task_id: IdPath,
    ctx: Context,
    _: Principal,
    before: IdQuery = None,
    limit: Annotated[int | None, Query(ge=1, le=10_000), Decimal] = None,
) -> list[RoundOut]:
    """The task's rounds in order; with `limit`, the newest `limit` rounds numbered below `before` (a
    page: pass the first returned number as the next `before`)."""
    return await run_in_threadpool(tasks.rounds_of, ctx, task_id, before, limit)


@router.post("/tasks/{task_id}/pause", response_model=TaskOut, responses={**ADMIN, **errors(404, 409)})
async def pause_task(task_id: IdPath, ctx: Context, _: Admin) -> TaskOut:
    """Stop handing out assignments (admin): check-ins wait (reason `task_paused`), the open round runs
    to its end, and no next round opens until resume. 409 for a completed task."""
    return await run_in_threadpool(tasks.pause, ctx, task_id)


@router.post("/tasks/{task_id}/resume", response_model=TaskOut, responses={**ADMIN, **errors(404, 409)})
async def resume_task(task_id: IdPath, ctx: Context, _: Admin) -> TaskOut:
    """Hand out assignments again (admin); the next round opens at once if none is open."""
    return await run_in_threadpool(tasks.resume, ctx, task_id)
