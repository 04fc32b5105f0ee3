from __future__ import annotations

from fastapi import APIRouter, status
from fastapi.concurrency import run_in_threadpool

from server_api.deps import Admin, Context, IdPath, Principal
from server_api.routes.responses import ADMIN, AUTHENTICATED, COMMON, JSON_BODY, errors
from server_api.schemas import RoundOut, TaskIn, TaskOut
from server_api.services import tasks

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
async def task_rounds(task_id: IdPath, ctx: Context, _: Principal) -> list[RoundOut]:
    return await run_in_threadpool(tasks.rounds_of, ctx, task_id)
