"""Round lifecycle: opening, check-in (selection with over-selection and pace steering), abandoning.

The deadline tick that closes rounds lives in :mod:`server_api.services.ticker`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session

from facefl.algorithms import registry
from facefl.compression import DEFAULT_ENCODING
from facefl.models import resolve_trainable
from server_api import metrics, security
from server_api.db import after_commit
from server_api.errors import conflict, not_found
from server_api.orm import (
    ROUND_ABANDONED,
    ROUND_OPEN,
    SECAGG_ADVERTISE,
    TASK_BUDGET_EXHAUSTED,
    TASK_PAUSED,
    TASK_RUNNING,
    Round,
    SecAggRound,
    Task,
    utcnow,
)
from server_api.round_policy import max_assignments, retry_after
from server_api.schemas import AssignmentOut, CheckinIn, RoundOut, TrainAction, WaitAction, WaitReason
from server_api.secagg_policy import assignment_info
from server_api.services import privacy, queries
from server_api.services.context import ServiceContext, log


def open_round(s: Session, task: Task) -> Round | None:
    """Open the task's next round on its current model version (caller owns the transaction).

    A paused task opens none (None): resuming it opens its next round. Neither does a task whose next
    round would spend more than its policy.dp.epsilon_budget: it becomes ``budget_exhausted`` (final)."""
    if task.status == TASK_PAUSED:
        return None
    if not privacy.may_open_round(task.policy, task.aggregated_rounds):
        task.status = TASK_BUDGET_EXHAUSTED
        log.info("privacy budget exhausted: no next round", extra={"task_id": task.id})
        return None
    policy = task.policy
    assert task.current_version is not None
    now = utcnow()
    rnd = Round(
        task_id=task.id,
        number=queries.next_round_number(s, task.id),
        status=ROUND_OPEN,
        base_version=task.current_version,
        target_reports=policy["target_reports"],
        min_reports=policy["min_reports"],
        max_assignments=max_assignments(policy["target_reports"], policy["over_selection"]),
        assigned=0,
        reported=0,
        opened_at=now,
        deadline=now + timedelta(seconds=float(policy["round_timeout_s"])),
        metrics={},
    )
    s.add(rnd)
    s.flush()
    secagg = assignment_info(policy)
    if secagg is not None:
        s.add(SecAggRound(round_id=rnd.id, stage=SECAGG_ADVERTISE, params=secagg.model_dump()))
    after_commit(s, metrics.ROUNDS_OPENED.inc)
    log.info("round opened", extra={"task_id": task.id, "round_id": rnd.id, "round_number": rnd.number})
    return rnd


def get(ctx: ServiceContext, round_id: int) -> RoundOut:
    with ctx.db.read() as s:
        rnd = s.get(Round, round_id)
        if rnd is None:
            raise not_found(f"round {round_id}")
        return RoundOut.model_validate(rnd)


#: what a check-in does: wait (for this reason), take a new assignment, or renew its assignment's token
Step = WaitReason | Literal["take", "renew"]


def decide(view: queries.CheckinView | None, now: datetime) -> Step:
    """The one definition of what a check-in does with what it read. PostgreSQL's one-statement
    check-in (:mod:`server_api.services.queries.checkin_statement`) writes exactly on its "take" and
    "renew" outcomes; tests/server_api/test_checkin_statement.py checks that they agree."""
    if view is None:
        return "no_task"
    if view.task_status == TASK_PAUSED:
        return "task_paused"
    if view.task_status == TASK_BUDGET_EXHAUSTED:
        return "privacy_budget_exhausted"
    if view.task_status != TASK_RUNNING:
        return "task_completed"
    rnd = view.round
    if rnd is None or rnd.status != ROUND_OPEN or rnd.deadline <= now:
        return "no_open_round"
    if rnd.assignment_id is None:
        return "take"
    # reported: done for this round; else the device lost its token (crash, reinstall): a fresh one
    # replaces it, the old one dies
    return "already_participated" if rnd.assignment_reported else "renew"


def checkin(ctx: ServiceContext, device_id: str, body: CheckinIn) -> TrainAction | WaitAction:
    """An assignment in the task's open round (a new one if a slot is free, or the device's own one with
    a fresh upload token), else a wait. On PostgreSQL one statement in autocommit (one round trip), else
    (or when that statement finds a concurrent check-in of the same device) one transaction of three or
    four indexed statements: :func:`checkin_transaction`."""
    now = utcnow()
    token = security.new_secret()
    token_hash = security.hash_secret(token)
    capabilities = body.capabilities.model_dump() if body.capabilities is not None else None
    done: queries.CheckinDone | None = None
    if not ctx.db.is_sqlite:
        with ctx.db.driver_statement() as tx:
            done = queries.checkin_at_once(tx, body.task_id, device_id, now, capabilities, token_hash)
    if done is None:
        view, step = checkin_transaction(ctx, device_id, body.task_id, now, capabilities, token_hash)
    else:
        view, step = done.view, decide(done.view, now)
        # the statement's write conditions are decide()'s outcomes (same row, same clock)
        assert done.took <= (step == "take") and done.renewed <= (step == "renew"), (step, done)
        if step == "take" and not done.took:
            step = "round_full"
    return answer(ctx, view, step, now, token)


def checkin_transaction(
    ctx: ServiceContext,
    device_id: str,
    task_id: int | None,
    now: datetime,
    capabilities: dict[str, Any] | None,
    token_hash: str,
) -> tuple[queries.CheckinView | None, Step]:
    """The check-in as a transaction of three or four statements: what it read, and what it did."""
    with ctx.db.driver_write() as tx:
        queries.touch_device(tx, device_id, now, capabilities)  # first: see touch_device
        view = queries.checkin_view(tx, task_id, device_id)
        step = decide(view, now)
        if step == "renew":
            assert view is not None and view.round is not None and view.round.assignment_id is not None
            queries.replace_upload_token(tx, view.round.assignment_id, token_hash)
        elif step == "take":
            assert view is not None and view.round is not None
            if not queries.take_assignment(tx, view.round.id, device_id, token_hash, now):
                step = "round_full"
    return view, step


def answer(
    ctx: ServiceContext, view: queries.CheckinView | None, step: Step, now: datetime, token: str
) -> TrainAction | WaitAction:
    """The check-in's answer: a wait (Retry-After by reason), or the assignment with its upload token."""
    st = ctx.settings
    if step != "take" and step != "renew":
        if view is None or step in _TASK_WAITS:
            seconds = st.max_retry_after_s
        elif step == "no_open_round":
            seconds = st.tick_interval_s
        else:  # already_participated, round_full: until the round's deadline
            assert view.round is not None
            seconds = (view.round.deadline - now).total_seconds()
        return WaitAction(
            retry_after_s=retry_after(seconds, st.min_retry_after_s, st.max_retry_after_s), reason=step
        )
    assert view is not None and view.round is not None
    rnd = view.round
    return TrainAction(
        assignment=AssignmentOut(
            round_id=rnd.id,
            task_id=view.task_id,
            round_number=rnd.number,
            base_version=rnd.base_version,
            # the local update devices run: a server-side optimizer's task trains with fedavg's, so
            # devices built before the algorithm was added take part
            algorithm=registry.get(view.algorithm).wire_name,
            architecture=view.architecture,
            embedding_dim=view.embedding_dim,
            image_size=view.image_size,
            hyperparams=view.hyperparams,
            deadline=rnd.deadline,
            upload_token=token,
            trainable=view.trainable,
            trainable_prefixes=_list_or_none(resolve_trainable(view.architecture, view.trainable)),
            # absent from the policy of a task created before compressed updates: float32
            update_encoding=view.policy.get("update_encoding", DEFAULT_ENCODING),
            update_error_feedback=bool(view.policy.get("update_error_feedback", False)),
            secure_aggregation=assignment_info(view.policy),
        )
    )


_TASK_WAITS = frozenset({"no_task", "task_paused", "privacy_budget_exhausted", "task_completed"})


def _list_or_none(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


def abandon(ctx: ServiceContext, round_id: int, reason: str | None = None) -> bool:
    """open -> abandoned, and a new round on the same base model opens in the same transaction.

    ``reason`` is kept in the round's metrics (``abandoned_reason``); its updates are never aggregated."""
    now = utcnow()
    values = {} if reason is None else {"metrics": {"abandoned_reason": reason}}
    with ctx.db.write() as s:
        if not queries.finish_round(s, round_id, ROUND_OPEN, ROUND_ABANDONED, now, **values):
            return False
        rnd = s.get(Round, round_id)
        assert rnd is not None
        s.refresh(rnd)
        task = s.get(Task, rnd.task_id)
        assert task is not None
        log.info("round abandoned", extra={"round_id": round_id, "reported": rnd.reported})
        after_commit(s, metrics.ROUNDS_CLOSED.labels(outcome="abandoned").inc)
        open_round(s, task)
        return True


def abandon_open(ctx: ServiceContext, round_id: int) -> RoundOut:
    """The operator abandons the open round (404 unknown round, 409 not open): its reports are dropped
    and the next round opens on the same base version (none while the task is paused)."""
    if not abandon(ctx, round_id, "abandoned by the operator"):
        current = get(ctx, round_id)  # 404 for an unknown round
        raise conflict(f"round {round_id} is {current.status}, not open", code="round_not_open")
    return get(ctx, round_id)
