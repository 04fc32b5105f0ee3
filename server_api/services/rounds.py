"""Round lifecycle: opening, check-in (selection with over-selection and pace steering), abandoning.

The deadline tick that closes rounds lives in :mod:`server_api.services.ticker`."""

from __future__ import annotations

from datetime import timedelta

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


def checkin(ctx: ServiceContext, device_id: str, body: CheckinIn) -> TrainAction | WaitAction:
    """An assignment in the task's open round (a new one if a slot is free, or the device's own one with
    a fresh upload token), else a wait: one transaction of three or four indexed statements."""
    st = ctx.settings
    now = utcnow()

    def wait(seconds: float, reason: WaitReason) -> WaitAction:
        return WaitAction(
            retry_after_s=retry_after(seconds, st.min_retry_after_s, st.max_retry_after_s), reason=reason
        )

    token = security.new_secret()
    token_hash = security.hash_secret(token)
    capabilities = body.capabilities.model_dump() if body.capabilities is not None else None
    with ctx.db.driver_write() as tx:
        queries.touch_device(tx, device_id, now, capabilities)  # first: see touch_device
        view = queries.checkin_view(tx, body.task_id, device_id)
        if view is None:
            return wait(st.max_retry_after_s, "no_task")
        if view.task_status == TASK_PAUSED:
            return wait(st.max_retry_after_s, "task_paused")
        if view.task_status == TASK_BUDGET_EXHAUSTED:
            return wait(st.max_retry_after_s, "privacy_budget_exhausted")
        if view.task_status != TASK_RUNNING:
            return wait(st.max_retry_after_s, "task_completed")
        rnd = view.round
        if rnd is None or rnd.status != ROUND_OPEN or rnd.deadline <= now:
            return wait(st.tick_interval_s, "no_open_round")
        until_deadline = (rnd.deadline - now).total_seconds()
        if rnd.assignment_id is not None:
            if rnd.assignment_reported:
                return wait(until_deadline, "already_participated")
            # the device lost its token (crash, reinstall): a fresh one replaces it, the old one dies
            queries.replace_upload_token(tx, rnd.assignment_id, token_hash)
        elif not queries.take_assignment(tx, rnd.id, device_id, token_hash, now):
            return wait(until_deadline, "round_full")
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
