"""ORM queries: rounds and their aggregation leases, tasks, devices, model versions, the operator's views."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session

from server_api.orm import (
    ROUND_AGGREGATING,
    ROUND_OPEN,
    Assignment,
    Device,
    ModelVersion,
    Round,
    Task,
    Update,
)
from server_api.services.queries._tables import ACTIVE

# ----------------------------------------------------------------------------------------- ORM


def active_round(s: Session, task_id: int) -> Round | None:
    return s.scalars(select(Round).where(Round.task_id == task_id, Round.status.in_(ACTIVE))).first()


def next_round_number(s: Session, task_id: int) -> int:
    return (
        int(s.scalar(select(func.coalesce(func.max(Round.number), 0)).where(Round.task_id == task_id)) or 0)
        + 1
    )


def pick_task(s: Session, task_id: int | None) -> Task | None:
    if task_id is not None:
        return s.get(Task, task_id)
    # the oldest running task that has an open round, else the oldest running task
    with_open = s.scalars(
        select(Task)
        .join(Round, Round.task_id == Task.id)
        .where(Task.status == "running", Round.status == ROUND_OPEN)
        .order_by(Task.id)
    ).first()
    return with_open or s.scalars(select(Task).where(Task.status == "running").order_by(Task.id)).first()


def assignment_of(s: Session, round_id: int, device_id: str) -> Assignment | None:
    return s.scalars(
        select(Assignment).where(Assignment.round_id == round_id, Assignment.device_id == device_id)
    ).first()


def claim_assignment_slot(s: Session, round_id: int) -> bool:
    """Compare-and-set: take one of the round's assignment slots if it is open and not full."""
    res = s.execute(
        update(Round)
        .where(Round.id == round_id, Round.status == ROUND_OPEN, Round.assigned < Round.max_assignments)
        .values(assigned=Round.assigned + 1)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def count_report(s: Session, round_id: int, now: datetime) -> bool:
    """Compare-and-set: count one report on a round that is still open and before its deadline."""
    res = s.execute(
        update(Round)
        .where(Round.id == round_id, Round.status == ROUND_OPEN, Round.deadline > now)
        .values(reported=Round.reported + 1)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def _dead_aggregation(stale_before: datetime) -> ColumnElement[bool]:
    """An aggregation whose heartbeat stopped before ``stale_before`` (its worker died)."""
    beat = func.coalesce(Round.aggregation_heartbeat_at, Round.aggregation_started_at)
    return (Round.status == ROUND_AGGREGATING) & (beat < stale_before)


def _held(round_id: int, lease: datetime) -> ColumnElement[bool]:
    """The round is still being aggregated under ``lease`` (no other worker took it over)."""
    aggregating = (Round.id == round_id) & (Round.status == ROUND_AGGREGATING)
    return aggregating & (Round.aggregation_started_at == lease)


def start_aggregation(s: Session, round_id: int, now: datetime, stale_before: datetime) -> bool:
    """Compare-and-set open -> aggregating (or take over an aggregation whose heartbeat stopped)."""
    res = s.execute(
        update(Round)
        .where(Round.id == round_id, (Round.status == ROUND_OPEN) | _dead_aggregation(stale_before))
        .values(status=ROUND_AGGREGATING, aggregation_started_at=now, aggregation_heartbeat_at=now)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def renew_aggregation(s: Session, round_id: int, lease: datetime, now: datetime) -> bool:
    """The heartbeat of the aggregation holding ``lease``; False once it has lost the round."""
    res = s.execute(update(Round).where(_held(round_id, lease)).values(aggregation_heartbeat_at=now))
    return res.rowcount == 1  # type: ignore[attr-defined]


def finish_round(
    s: Session, round_id: int, from_status: str, to_status: str, now: datetime, **values: object
) -> bool:
    """Compare-and-set the round's final status; False when another worker got there first."""
    res = s.execute(
        update(Round)
        .where(Round.id == round_id, Round.status == from_status)
        .values(status=to_status, closed_at=now, **values)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def finish_aggregation(s: Session, round_id: int, lease: datetime, now: datetime, **values: object) -> bool:
    """aggregating -> aggregated, fenced by our lease so a taken-over aggregation cannot finish twice."""
    res = s.execute(
        update(Round)
        .where(_held(round_id, lease))
        .values(**{"status": "aggregated", "closed_at": now, **values})
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def first_base_version(s: Session, task_id: int) -> int | None:
    """The model version the task started from: the base of its first round."""
    first = select(Round.base_version).where(Round.task_id == task_id).order_by(Round.id).limit(1)
    return s.scalar(first)


def updates_of(s: Session, round_id: int) -> Sequence[Update]:
    return s.scalars(select(Update).where(Update.round_id == round_id).order_by(Update.id)).all()


def rounds_needing_attention(s: Session, now: datetime, stale_before: datetime) -> Sequence[Round]:
    return s.scalars(
        select(Round).where(
            (
                (Round.status == ROUND_OPEN)
                & ((Round.deadline <= now) | (Round.reported >= Round.target_reports))
            )
            | _dead_aggregation(stale_before)
        )
    ).all()


def running_tasks_without_active_round(s: Session) -> Sequence[Task]:
    active = select(Round.task_id).where(Round.status.in_(ACTIVE))
    return s.scalars(select(Task).where(Task.status == "running", Task.id.not_in(active))).all()


def blob_referenced(s: Session, key: str) -> bool:
    in_updates = s.scalar(select(func.count()).select_from(Update).where(Update.blob_key == key))
    in_models = s.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.blob_key == key))
    return bool(in_updates) or bool(in_models)


def rounds_of(
    s: Session, task_id: int, before_number: int | None = None, limit: int | None = None
) -> Sequence[Round]:
    """The task's rounds in order; with ``limit``, the newest ``limit`` of those numbered below
    ``before_number`` (a page of a long task, still in order)."""
    q = select(Round).where(Round.task_id == task_id)
    if before_number is not None:
        q = q.where(Round.number < before_number)
    if limit is None:
        return s.scalars(q.order_by(Round.number)).all()
    return list(reversed(s.scalars(q.order_by(Round.number.desc()).limit(limit)).all()))


def set_task_status(s: Session, task_id: int, from_status: str, to_status: str) -> bool:
    """Compare-and-set the task's status (pause, resume); False when it was not ``from_status``."""
    res = s.execute(
        update(Task).where(Task.id == task_id, Task.status == from_status).values(status=to_status)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def participants_of(s: Session, round_id: int) -> Sequence[tuple[Assignment, Update | None]]:
    """The round's assignments in the order they were issued, each with its accepted update if any."""
    rows = s.execute(
        select(Assignment, Update)
        .outerjoin(Update, Update.assignment_id == Assignment.id)
        .where(Assignment.round_id == round_id)
        .order_by(Assignment.id)
    ).all()
    return [(a, u) for a, u in rows]


def count_devices(s: Session) -> int:
    return int(s.scalar(select(func.count()).select_from(Device)) or 0)


def devices_page(s: Session, limit: int, offset: int) -> Sequence[tuple[Device, int, int]]:
    """Devices, most recently seen first (never seen last), each with its assignments and reports."""
    page = (
        select(Device)
        .order_by(Device.last_seen_at.desc().nulls_last(), Device.created_at.desc(), Device.id)
        .limit(limit)
        .offset(offset)
    )
    devices = s.scalars(page).all()
    ids = [d.id for d in devices]
    counts = {
        device_id: (int(assigned), int(reported or 0))
        for device_id, assigned, reported in s.execute(
            select(
                Assignment.device_id,
                func.count(Assignment.id),
                func.sum(case((Assignment.reported, 1), else_=0)),
            )
            .where(Assignment.device_id.in_(ids))
            .group_by(Assignment.device_id)
        )
    }
    return [(d, *counts.get(d.id, (0, 0))) for d in devices]


def tasks(s: Session) -> Sequence[Task]:
    return s.scalars(select(Task).order_by(Task.id)).all()


def model_versions(
    s: Session, task_id: int | None, before: int | None = None, limit: int | None = None
) -> Sequence[ModelVersion]:
    """Model versions in order (of a task, or all); with ``limit``, the newest ``limit`` below ``before``."""
    q = select(ModelVersion)
    if task_id is not None:
        q = q.where(ModelVersion.task_id == task_id)
    if before is not None:
        q = q.where(ModelVersion.version < before)
    if limit is None:
        return s.scalars(q.order_by(ModelVersion.version)).all()
    return list(reversed(s.scalars(q.order_by(ModelVersion.version.desc()).limit(limit)).all()))


def version_metrics(s: Session, task_id: int) -> Sequence[tuple[int, dict[str, Any]]]:
    """(version, metrics) of every version of the task, in order: the two columns a quality curve needs."""
    rows = s.execute(
        select(ModelVersion.version, ModelVersion.metrics)
        .where(ModelVersion.task_id == task_id)
        .order_by(ModelVersion.version)
    ).all()
    return [(int(version), metrics or {}) for version, metrics in rows]
