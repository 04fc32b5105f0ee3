"""The operator's actions: pause or resume a task, abandon the open round. Each is a confirmation page
(GET) whose form posts back with the session's CSRF token (POST), and then calls the same service as the
admin REST route."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from server_api.console import render
from server_api.console.auth import FormError, Operator, check_post, csrf_of, read_form
from server_api.console.pages import parse_id
from server_api.errors import ApiError
from server_api.services import rounds, tasks
from server_api.services.context import ServiceContext, log

router = APIRouter(prefix="/console", include_in_schema=False)


@dataclass(frozen=True)
class Action:
    verb: str
    what: str  # "task" or "round"
    explanation: str
    run: Callable[[ServiceContext, int], object]


TASK_ACTIONS = {
    "pause": Action(
        "Pause",
        "task",
        "Devices get no new assignments. The open round runs to its end (devices already selected may "
        "still report); no next round opens until you resume the task.",
        tasks.pause,
    ),
    "resume": Action(
        "Resume",
        "task",
        "Devices get assignments again; the next round opens now if none is open.",
        tasks.resume,
    ),
}
ROUND_ACTIONS = {
    "abandon": Action(
        "Abandon",
        "round",
        "The round closes now without aggregating: its reports are dropped, and the next round opens on "
        "the same model version (unless the task is paused).",
        rounds.abandon_open,
    ),
}


def _confirm(ctx: ServiceContext, action: Action, ident: int, csrf: str) -> Response:
    try:  # the confirmation names what it acts on: a round by its number in its task
        if action.what == "round":
            rnd = rounds.get(ctx, ident)
            subject, back = f"round {rnd.number} of task {rnd.task_id}", f"/console/rounds/{ident}"
        else:
            task = tasks.get(ctx, ident)
            subject, back = f"task {task.id} ({task.name})", f"/console/tasks/{ident}"
    except ApiError as exc:
        return render.error(exc.status_code, exc.detail, csrf)
    return render.page(
        "confirm.html",
        title=f"{action.verb} {subject}?",
        action=action,
        subject=subject,
        target=f"/console/{action.what}s/{ident}/{action.verb.lower()}",
        back=back,
        csrf=csrf,
    )


def _lookup(table: dict[str, Action], name: str, ident_text: str) -> tuple[Action, int] | None:
    action, ident = table.get(name), parse_id(ident_text)
    return None if action is None or ident is None else (action, ident)


async def _confirm_route(request: Request, csrf: str, found: tuple[Action, int] | None) -> Response:
    if found is None:
        return await run_in_threadpool(render.error, 404, "no such action or id", csrf)
    ctx: ServiceContext = request.app.state.ctx
    return await run_in_threadpool(_confirm, ctx, found[0], found[1], csrf)


async def _perform(request: Request, s: Operator, found: tuple[Action, int] | None) -> Response:
    csrf = csrf_of(request, s)
    if found is None:
        return await run_in_threadpool(render.error, 404, "no such action or id", csrf)
    action, ident = found
    try:
        check_post(request, s, await read_form(request))
    except FormError as exc:
        log.info("console action refused: %s", exc.message, extra={"path": request.url.path})
        return await run_in_threadpool(render.error, exc.status_code, exc.message, csrf)
    ctx: ServiceContext = request.app.state.ctx
    try:
        await run_in_threadpool(action.run, ctx, ident)
    except ApiError as exc:
        return await run_in_threadpool(render.error, exc.status_code, exc.detail, csrf)
    log.info("console: %s %s %d", action.verb.lower(), action.what, ident)
    return render.secure(RedirectResponse(f"/console/{action.what}s/{ident}", 303))


@router.get("/tasks/{task_id}/{name}")
async def confirm_task_action(request: Request, s: Operator, task_id: str, name: str) -> Response:
    return await _confirm_route(request, csrf_of(request, s), _lookup(TASK_ACTIONS, name, task_id))


@router.post("/tasks/{task_id}/{name}")
async def task_action(request: Request, s: Operator, task_id: str, name: str) -> Response:
    return await _perform(request, s, _lookup(TASK_ACTIONS, name, task_id))


@router.get("/rounds/{round_id}/{name}")
async def confirm_round_action(request: Request, s: Operator, round_id: str, name: str) -> Response:
    return await _confirm_route(request, csrf_of(request, s), _lookup(ROUND_ACTIONS, name, round_id))


@router.post("/rounds/{round_id}/{name}")
async def round_action(request: Request, s: Operator, round_id: str, name: str) -> Response:
    return await _perform(request, s, _lookup(ROUND_ACTIONS, name, round_id))
