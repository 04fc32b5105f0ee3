"""The hot paths (authentication, check-in, upload intake): Core statements built once at import and
run as :class:`server_api.driver.Prepared` statements on the driver's connection: no ORM object loading,
no statement construction, and none of SQLAlchemy's per-execution machinery per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    CTE,
    ColumnElement,
    Insert,
    Table,
    and_,
    bindparam,
    false,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import Update as UpdateStatement

from server_api.driver import DriverTransaction, Prepared
from server_api.orm import (
    ROUND_OPEN,
    ModelVersion,
    Update,
)
from server_api.services.queries._tables import ACTIVE, _assignments, _devices, _rounds, _tasks

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
    check-ins of one device, so two concurrent ones cannot both take a slot in the same round (the
    check-in's next statement runs with a snapshot taken once the lock is held: it must stay a separate
    statement, not a CTE of the next one; :mod:`.checkin_statement`, which has it as a CTE, detects a
    concurrent check-in instead and then leaves the check-in to this transaction)."""
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
    return None if row is None else view_of_row(row)


def view_of_row(row: tuple[Any, ...]) -> CheckinView | None:
    """The CheckinView of a row of the check-in view's columns (all NULL: no such task)."""
    if row[0] is None:
        return None
    active = ActiveRound(*row[9:]) if row[9] is not None else None
    task_id, status, algorithm, architecture, dim, size, hyperparams, trainable, policy = row[:9]
    return CheckinView(
        task_id, status, algorithm, architecture, dim, size, hyperparams, trainable, policy, active
    )


def claim_slot(round_id: ColumnElement[Any]) -> UpdateStatement:
    """A slot of round ``round_id``, taken only while it is open and not full (compare-and-set)."""
    return (
        update(_rounds)
        .where(
            _rounds.c.id == round_id,
            _rounds.c.status == ROUND_OPEN,
            _rounds.c.assigned < _rounds.c.max_assignments,
        )
        .values(assigned=_rounds.c.assigned + 1)
    )


def assignment_of_claim(claimed: CTE) -> Insert:
    """The device's assignment, inserted exactly when ``claimed`` (a slot claim's RETURNING id) has a row."""
    return insert(_assignments).from_select(
        ["round_id", "device_id", "upload_token_hash", "issued_at", "reported"],
        select(
            claimed.c.id,
            bindparam("device_id", type_=_assignments.c.device_id.type),
            bindparam("token_hash", type_=_assignments.c.upload_token_hash.type),
            bindparam("now", type_=_assignments.c.issued_at.type),
            false(),
        ),
    )


_claim_slot = claim_slot(bindparam("round_id"))
_CLAIM_SLOT = Prepared(_claim_slot)
_INSERT_ASSIGNMENT = Prepared(
    insert(_assignments).values(
        round_id=bindparam("round_id"),
        device_id=bindparam("device_id"),
        upload_token_hash=bindparam("token_hash"),
        issued_at=bindparam("now"),
        reported=False,
    )
)
# PostgreSQL: both in one statement (one round trip); the INSERT reads the UPDATE's RETURNING, so it
# inserts a row exactly when the slot was taken
_CLAIM_AND_INSERT_ASSIGNMENT = Prepared(
    assignment_of_claim(_claim_slot.returning(_rounds.c.id).cte("claimed"))
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
    params = {"round_id": round_id, "device_id": device_id, "token_hash": token_hash, "now": now}
    if tx.dialect_name == "postgresql":
        return tx.execute(_CLAIM_AND_INSERT_ASSIGNMENT, params) == 1
    if tx.execute(_CLAIM_SLOT, {"round_id": round_id}) != 1:
        return False
    tx.execute(_INSERT_ASSIGNMENT, params)
    return True


def replace_upload_token(tx: DriverTransaction, assignment_id: int, token_hash: str) -> None:
    tx.execute(_NEW_UPLOAD_TOKEN, {"assignment_id": assignment_id, "token_hash": token_hash})


_updates = cast(Table, Update.__table__)
_versions = cast(Table, ModelVersion.__table__)

_VERSION_BLOB = Prepared(
    select(_versions.c.blob_key, _versions.c.sha256, _versions.c.size_bytes, _versions.c.served).where(
        _versions.c.version == bindparam("version")
    )
)


def version_blob(tx: DriverTransaction, version: int) -> tuple[str, str, int, bool] | None:
    """A model version's (blob key, sha256, size, served), or None: no such (committed) version."""
    row = tx.first(_VERSION_BLOB, {"version": version})
    return None if row is None else (row[0], row[1], int(row[2]), bool(row[3]))


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
