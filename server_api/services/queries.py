"""Every query of the service layer, in one place.

The hot paths (authentication, check-in, upload intake) are Core statements built once at import and
run as :class:`server_api.driver.Prepared` statements on the driver's connection: no ORM object loading,
no statement construction, and none of SQLAlchemy's per-execution machinery per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, bindparam, case, func, insert, select, text, update
from sqlalchemy.orm import Session

from server_api.driver import DriverTransaction, Prepared
from server_api.orm import (
    ROUND_AGGREGATING,
    ROUND_OPEN,
    Assignment,
    Device,
    ModelVersion,
    Round,
    SecAggMember,
    SecAggReveal,
    SecAggRound,
    SecAggShare,
    Task,
    Update,
)

ACTIVE = (ROUND_OPEN, ROUND_AGGREGATING)

_devices = cast(Table, Device.__table__)
_tasks = cast(Table, Task.__table__)
_rounds = cast(Table, Round.__table__)
_assignments = cast(Table, Assignment.__table__)

# ------------------------------------------------------------------------------- hot path (driver)

_TOKEN_HASH = Prepared(select(_devices.c.token_hash).where(_devices.c.id == bindparam("device_id")))
_INSERT_DEVICE = Prepared(
    insert(_devices).values(
        id=bindparam("device_id"),
        name=bindparam("name"),
        token_hash=bindparam("token_hash"),
        capabilities=bindparam("capabilities"),
        created_at=bindparam("now"),
    )
)
_TOUCH = update(_devices).where(_devices.c.id == bindparam("device_id"))
_SEEN = Prepared(_TOUCH.values(last_seen_at=bindparam("now")))
_SEEN_WITH_CAPABILITIES = Prepared(
    _TOUCH.values(last_seen_at=bindparam("now"), capabilities=bindparam("caps"))
)


def insert_device(
    tx: DriverTransaction,
    device_id: str,
    name: str | None,
    token_hash: str,
    capabilities: dict[str, Any],
    now: datetime,
) -> None:
    params = {"device_id": device_id, "name": name, "token_hash": token_hash, "capabilities": capabilities}
    tx.execute(_INSERT_DEVICE, {**params, "now": now})


def device_token_hash(tx: DriverTransaction, device_id: str) -> str | None:
    """The stored hash of a device's bearer secret (None: no such device)."""
    return cast(str | None, tx.scalar(_TOKEN_HASH, {"device_id": device_id}))


def touch_device(
    tx: DriverTransaction, device_id: str, now: datetime, capabilities: dict[str, Any] | None
) -> None:
    """last_seen_at (and the capabilities when sent). On PostgreSQL the row lock it takes serializes the
    check-ins of one device, so two concurrent ones cannot both take a slot in the same round."""
    if capabilities is None:
        tx.execute(_SEEN, {"device_id": device_id, "now": now})
    else:
        tx.execute(_SEEN_WITH_CAPABILITIES, {"device_id": device_id, "now": now, "caps": capabilities})


@dataclass(frozen=True)
class ActiveRound:
    """A task's active round, and this device's assignment in it (if any)."""

    id: int
    number: int
    status: str
    base_version: int
    deadline: datetime
    assignment_id: int | None
    assignment_reported: bool | None


@dataclass(frozen=True)
class CheckinView:
    """What a check-in reads: the task and its active round (None: it has none)."""

    task_id: int
    task_status: str
    algorithm: str
    architecture: str
    embedding_dim: int
    image_size: int
    hyperparams: dict[str, Any]
    trainable: list[str] | None
    policy: dict[str, Any]
    round: ActiveRound | None


# the predicate of the partial index uq_rounds_one_active_per_task, as literal SQL: SQLite uses a partial
# index only when the query holds its WHERE term (bound parameters would not do)
_ROUND_IS_ACTIVE = text(f"rounds.status IN ({', '.join(repr(s) for s in ACTIVE)})")


def _checkin_view(task_id: ColumnElement[Any]) -> Prepared:
    r, a, t = _rounds, _assignments, _tasks
    columns = (
        t.c.id,
        t.c.status,
        t.c.algorithm,
        t.c.architecture,
        t.c.embedding_dim,
        t.c.image_size,
        t.c.hyperparams,
        t.c.trainable,
        t.c.policy,
        r.c.id,
        r.c.number,
        r.c.status,
        r.c.base_version,
        r.c.deadline,
        a.c.id,
        a.c.reported,
    )  # the order of CheckinView's fields, then ActiveRound's
    return Prepared(
        select(*columns)
        # primary key, then the partial unique index uq_rounds_one_active_per_task, then
        # uq_assignments_round_device: one row, three index look-ups
        .outerjoin(r, and_(r.c.task_id == t.c.id, _ROUND_IS_ACTIVE))
        .outerjoin(a, and_(a.c.round_id == r.c.id, a.c.device_id == bindparam("device_id")))
        .where(t.c.id == task_id)
    )


# without a task id: the oldest running task that has an open round, else the oldest running task
_DEFAULT_TASK = func.coalesce(
    select(func.min(_tasks.c.id))
    .join(_rounds, _rounds.c.task_id == _tasks.c.id)
    .where(_tasks.c.status == "running", _rounds.c.status == ROUND_OPEN)
    .scalar_subquery(),
    select(func.min(_tasks.c.id)).where(_tasks.c.status == "running").scalar_subquery(),
)
_CHECKIN_VIEW_OF_TASK = _checkin_view(bindparam("task_id"))
_CHECKIN_VIEW_DEFAULT = _checkin_view(_DEFAULT_TASK)


def checkin_view(tx: DriverTransaction, task_id: int | None, device_id: str) -> CheckinView | None:
    """The task a check-in is for (``task_id``, or the default task), its active round and this device's
    assignment in that round, in one indexed statement; None when there is no such task."""
    if task_id is None:
        row = tx.first(_CHECKIN_VIEW_DEFAULT, {"device_id": device_id})
    else:
        row = tx.first(_CHECKIN_VIEW_OF_TASK, {"task_id": task_id, "device_id": device_id})
    if row is None:
        return None
    active = ActiveRound(*row[9:]) if row[9] is not None else None
    task_id, status, algorithm, architecture, dim, size, hyperparams, trainable, policy = row[:9]
    return CheckinView(
        task_id, status, algorithm, architecture, dim, size, hyperparams, trainable, policy, active
    )


_CLAIM_SLOT = Prepared(
    update(_rounds)
    .where(
        _rounds.c.id == bindparam("round_id"),
        _rounds.c.status == ROUND_OPEN,
        _rounds.c.assigned < _rounds.c.max_assignments,
    )
    .values(assigned=_rounds.c.assigned + 1)
)
_INSERT_ASSIGNMENT = Prepared(
    insert(_assignments).values(
        round_id=bindparam("round_id"),
        device_id=bindparam("device_id"),
        upload_token_hash=bindparam("token_hash"),
        issued_at=bindparam("now"),
        reported=False,
    )
)
_NEW_UPLOAD_TOKEN = Prepared(
    update(_assignments)
    .where(_assignments.c.id == bindparam("assignment_id"))
    .values(upload_token_hash=bindparam("token_hash"))
)


def take_assignment(
    tx: DriverTransaction, round_id: int, device_id: str, token_hash: str, now: datetime
) -> bool:
    """Compare-and-set one of the round's slots (open and not full), then the device's assignment row;
    False (and nothing written) when the round is full or no longer open."""
    if tx.execute(_CLAIM_SLOT, {"round_id": round_id}) != 1:
        return False
    params = {"round_id": round_id, "device_id": device_id, "token_hash": token_hash, "now": now}
    tx.execute(_INSERT_ASSIGNMENT, params)
    return True


def replace_upload_token(tx: DriverTransaction, assignment_id: int, token_hash: str) -> None:
    tx.execute(_NEW_UPLOAD_TOKEN, {"assignment_id": assignment_id, "token_hash": token_hash})


_updates = cast(Table, Update.__table__)
_versions = cast(Table, ModelVersion.__table__)


@dataclass(frozen=True)
class UploadView:
    """What an upload is checked against before its body is read: the round, its task and base model,
    and the device's assignment in it (None: none)."""

    round_status: str
    deadline: datetime
    base_version: int
    base_blob_key: str
    policy: dict[str, Any]
    algorithm: str
    embedding_dim: int
    architecture: str
    trainable: list[str] | None
    assignment_id: int | None
    reported: bool | None
    upload_token_hash: str | None


_UPLOAD_VIEW = Prepared(
    select(
        _rounds.c.status,
        _rounds.c.deadline,
        _rounds.c.base_version,
        _versions.c.blob_key,
        _tasks.c.policy,
        _tasks.c.algorithm,
        _tasks.c.embedding_dim,
        _tasks.c.architecture,
        _tasks.c.trainable,
        _assignments.c.id,
        _assignments.c.reported,
        _assignments.c.upload_token_hash,
    )  # the order of UploadView's fields
    .join(_tasks, _tasks.c.id == _rounds.c.task_id)
    .join(_versions, _versions.c.version == _rounds.c.base_version)
    .outerjoin(
        _assignments,
        and_(_assignments.c.round_id == _rounds.c.id, _assignments.c.device_id == bindparam("device_id")),
    )
    .where(_rounds.c.id == bindparam("round_id"))
)


def upload_view(tx: DriverTransaction, round_id: int, device_id: str) -> UploadView | None:
    """One indexed statement (primary keys and uq_assignments_round_device); None: no such round."""
    row = tx.first(_UPLOAD_VIEW, {"round_id": round_id, "device_id": device_id})
    return None if row is None else UploadView(*row)


_MARK_REPORTED = Prepared(
    update(_assignments)
    .where(
        _assignments.c.id == bindparam("assignment_id"),
        _assignments.c.reported.is_(False),
        _assignments.c.upload_token_hash == bindparam("token_hash"),
    )
    .values(reported=True)
)
_COUNT_REPORT = Prepared(
    update(_rounds)
    .where(
        _rounds.c.id == bindparam("round_id"),
        _rounds.c.status == ROUND_OPEN,
        _rounds.c.deadline > bindparam("now"),
    )
    .values(reported=_rounds.c.reported + 1)
    .returning(_rounds.c.reported, _rounds.c.target_reports)
)
_INSERT_UPDATE = Prepared(
    insert(_updates)
    .values(
        round_id=bindparam("round_id"),
        device_id=bindparam("device_id"),
        assignment_id=bindparam("assignment_id"),
        blob_key=bindparam("blob_key"),
        size_bytes=bindparam("size_bytes"),
        num_samples=bindparam("num_samples"),
        norm=bindparam("norm"),
        metrics=bindparam("metrics"),
        created_at=bindparam("now"),
    )
    .returning(_updates.c.id)
)


def record_update(tx: DriverTransaction, row: dict[str, Any]) -> tuple[int, int, int] | None:
    """Compare-and-set the assignment (not reported yet, and this upload token) and the round (open,
    before its deadline), then the update row: (update id, reports, target reports), or None when
    either compare-and-set failed (the caller rolls back and says why)."""
    if tx.execute(_MARK_REPORTED, row) != 1:
        return None
    counted = tx.first(_COUNT_REPORT, row)
    if counted is None:
        return None
    update_id = tx.scalar(_INSERT_UPDATE, row)
    return int(update_id), int(counted[0]), int(counted[1])


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


# ------------------------------------------------------------------------------ secure aggregation


def secagg_state(s: Session, round_id: int, *, lock: bool = False) -> SecAggRound | None:
    """The round's secure-aggregation row; ``lock``: FOR UPDATE on PostgreSQL (SQLite has one writer),
    so stage changes and the requests of a stage are serialized per round."""
    stmt = select(SecAggRound).where(SecAggRound.round_id == round_id)
    return s.scalars(stmt.with_for_update() if lock else stmt).first()


def secagg_members(s: Session, round_id: int) -> Sequence[SecAggMember]:
    return s.scalars(
        select(SecAggMember).where(SecAggMember.round_id == round_id).order_by(SecAggMember.device_id)
    ).all()


def secagg_round_ids(s: Session, round_ids: Sequence[int]) -> set[int]:
    if not round_ids:
        return set()
    return set(s.scalars(select(SecAggRound.round_id).where(SecAggRound.round_id.in_(round_ids))).all())


def secagg_inbox(s: Session, round_id: int, recipient: str) -> Sequence[SecAggShare]:
    """The shares for ``recipient`` from the devices that stayed in the share stage's outcome (U2)."""
    sharers = select(SecAggMember.device_id).where(SecAggMember.round_id == round_id, SecAggMember.shared)
    return s.scalars(
        select(SecAggShare)
        .where(
            SecAggShare.round_id == round_id,
            SecAggShare.recipient_id == recipient,
            SecAggShare.sender_id.in_(sharers),
        )
        .order_by(SecAggShare.sender_id)
    ).all()


def secagg_reveals(s: Session, round_id: int) -> Sequence[SecAggReveal]:
    return s.scalars(select(SecAggReveal).where(SecAggReveal.round_id == round_id)).all()


def uploaders_of(s: Session, round_id: int) -> list[str]:
    return list(s.scalars(select(Update.device_id).where(Update.round_id == round_id)).all())


def record_masked_update(
    s: Session, assignment: Assignment, *, blob_key: str, size_bytes: int, now: datetime
) -> int | None:
    """A masked upload: compare-and-set the assignment (not reported), count it on the open round, add
    its row (weight and norm unknown to the server: 0); its id. None: a compare-and-set failed (the caller
    rolls back)."""
    marked = s.execute(
        update(Assignment)
        .where(Assignment.id == assignment.id, Assignment.reported.is_(False))
        .values(reported=True)
    )
    if marked.rowcount != 1:  # type: ignore[attr-defined]
        return None
    counted = s.execute(
        update(Round)
        .where(Round.id == assignment.round_id, Round.status == ROUND_OPEN)
        .values(reported=Round.reported + 1)
    )
    if counted.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = Update(
        round_id=assignment.round_id,
        device_id=assignment.device_id,
        assignment_id=assignment.id,
        blob_key=blob_key,
        size_bytes=size_bytes,
        num_samples=0,
        norm=0.0,
        metrics={},
        created_at=now,
    )
    s.add(row)
    s.flush()
    return row.id
